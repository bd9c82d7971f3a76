from sockstack import Service, method


class Calculator(Service):
    @method
    def add(self, a: int, b: int) -> int:
        """a + b"""
        return a + b
