"""dtwin up and dtwin bench loop (filled in next)."""


def register(sub, bench) -> None:
    return None
