"""Lifecycle plugins that ship with sockserve (registered in ``sockserve.plugins``)."""

__all__: list[str] = []
