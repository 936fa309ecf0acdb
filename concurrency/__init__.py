"""Built-in concurrency strategies (sync, threading, forking), loaded through the
``sockserve.concurrency`` entry points; this package imports nothing by itself."""

__all__: list[str] = []
