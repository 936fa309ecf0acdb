"""Example sockserve plugins: a process pool, a SOCK_SEQPACKET transport, a request counter."""

__all__: list[str] = []
