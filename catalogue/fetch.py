"""Fetching the signed index from the origin, never reading more than the limit (endless data)."""
from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request

from cluster.errors import DataError, TempFailure
from catalogue.index import MAX_SIG_BYTES

DEFAULT_TIMEOUT = 30.0


def fetch_bytes(url: str, max_bytes: int, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """The body at `url`; DataError past `max_bytes` (whatever Content-Length claims), TempFailure
    (75) when the origin cannot be reached, so a scheduler or timer simply tries again."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - http(s) URL from the spec
            claimed = resp.headers.get("Content-Length")
            if claimed and claimed.isdigit() and int(claimed) > max_bytes:
                raise DataError(f"{url}: {claimed} bytes exceeds the limit of {max_bytes} bytes; refused unread")
            data = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as e:
        raise TempFailure(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise TempFailure(f"{url}: cannot fetch: {getattr(e, 'reason', e)}") from None
    if len(data) > max_bytes:
        raise DataError(f"{url}: more than the limit of {max_bytes} bytes; refused")
    return data


def fetch_signed_index(base_url: str, max_bytes: int, timeout: float = DEFAULT_TIMEOUT) -> tuple[bytes, bytes]:
    """(index.yaml bytes, index.yaml.sig bytes) from the origin at `base_url`."""
    if not base_url.startswith(("http://", "https://")):
        raise DataError(f"catalogue URL {base_url!r}: expected http(s)://HOST:PORT/")
    base = base_url if base_url.endswith("/") else base_url + "/"
    raw = fetch_bytes(urllib.parse.urljoin(base, "index.yaml"), max_bytes, timeout)
    sig = fetch_bytes(urllib.parse.urljoin(base, "index.yaml.sig"), MAX_SIG_BYTES, timeout)
    return raw, sig
