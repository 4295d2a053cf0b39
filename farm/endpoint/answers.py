"""What the endpoint sends back when its cache has nothing: a server's answer, made safe, or
the farm's own error.

`relay` forwards a checked request to one compile server (farm/endpoint/forward.py), reads
its answer with the strict reader (farm/endpoint/wire.py), replaces its module signatures by
the farm's (farm/endpoint/identity.py) and re-encodes it: nothing a server wrote reaches the
cache or a client unchecked. Whatever goes wrong becomes an `error_answer`, the `Server: ...`
line the client prints; addresses and exception texts stay in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from farm.core.errors import FarmError
from farm.endpoint import wire
from farm.endpoint.forward import TooLarge, Unreachable, forward
from farm.endpoint.routing import Target, Upstream
from farm.endpoint.settings import Settings

log = logging.getLogger("stapfarm.endpoint")


def relay(upstream: Upstream, data: bytes, target: Target, settings: Settings,
          sign: Callable[[bytes], bytes] | None) -> bytes:
    """UPSTREAM's answer to DATA, checked and re-encoded, the farm's signatures in it (when
    sign is given); an error answer when the server fails or its answer is refused.

    Raises:
        Unreachable: nothing listens there (nothing was sent).
    """
    s = settings
    try:
        raw = forward(upstream.host, upstream.port, data, upstream.pin, s.forward_timeout,
                      s.max_response)
    except Unreachable:
        raise
    except TooLarge:
        log.warning("%s answered more than %d bytes", upstream.name, s.max_response)
        return error_answer(f"the compile server's answer for {target} is larger than this "
                            f"farm's limit of {s.max_response} bytes", s.server_version)
    except FarmError as e:
        log.warning("%s failed: %s", upstream.name, e)
        return error_answer(f"the compile server for {target} failed ({_short(e)}); see the "
                            "farm's logs", s.server_version)
    if not raw:
        return error_answer(f"the compile server for {target} closed the connection without "
                            "an answer; see the farm's logs", s.server_version)
    try:
        response = wire.inspect_response(raw, s.max_response)
    except wire.ResponseError as e:
        log.warning("%s sent an answer the endpoint refuses: %s", upstream.name, e)
        return error_answer(f"the compile server for {target} sent a malformed answer",
                            s.server_version)
    if sign is not None:
        response = wire.replace_signatures(response, sign)
    return wire.encode_response(response)


def error_answer(message: str, server_version: str) -> bytes:
    """The response zip answering a request with message (the client prints "Server: ...")."""
    log.info("answering with an error: %s", message)
    return wire.error_response(message, server_version)


def _short(error: BaseException) -> str:
    """A reason for the client without addresses: the last clause of the message."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.rsplit(": ", 1)[-1][:80] if "did not answer" not in text else "timed out"
