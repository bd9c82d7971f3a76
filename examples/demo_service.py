"""The README's service: define it once, serve it over TCP and UDP.

sockstack serve demo_service:Calculator --tcp 127.0.0.1:5050 --udp 127.0.0.1:5051
"""

from sockstack import Service, method


class Calculator(Service):
    @method
    def add(self, a: int, b: int) -> int:
        return a + b
