"""Remote objects (the seed's DCOM pattern): objects that live in a server, called through
proxies as if they were local (PROTOCOL.md §4.5; docs/OBJECTS.md).

::

    from sockstack.objects import expose, ObjectServer, lookup

    @expose
    class Counter:
        def __init__(self) -> None: self.n = 0
        def incr(self, by: int = 1) -> int: self.n += by; return self.n
        def child(self) -> "Counter": return Counter()      # crosses as a reference

    server = ObjectServer(tcp=["127.0.0.1:5054"]); server.register("counter", Counter())

    with lookup("tcp://127.0.0.1:5054/counter") as counter:
        counter.incr(5)                # 5
        c2 = counter.child()           # a proxy of a new remote object
        c2.incr()                      # 1
"""

from sockstack.objects.client import (
    AsyncObjectClient,
    AsyncPromise,
    AsyncProxy,
    Batch,
    ObjectClient,
    Pending,
    Promise,
    Proxy,
    alookup,
    batch,
    close,
    lookup,
    release,
    resolve,
)
from sockstack.objects.expose import expose, exposed
from sockstack.objects.names import Names, UnknownName
from sockstack.objects.pattern import ObjectLimits, Objects
from sockstack.objects.server import ObjectServer

__all__ = [
    "AsyncObjectClient",
    "AsyncPromise",
    "AsyncProxy",
    "Batch",
    "Names",
    "ObjectClient",
    "ObjectLimits",
    "ObjectServer",
    "Objects",
    "Pending",
    "Promise",
    "Proxy",
    "UnknownName",
    "alookup",
    "batch",
    "close",
    "expose",
    "exposed",
    "lookup",
    "release",
    "resolve",
]
