"""`headrace probe`: exit 0 only when the server can serve (for images without curl).

Ready means `/health` answers 200 and `/v1/models` returns a non-empty `data` list; anything else
(refused connection, loading, draining, failed, empty list, timeout) exits 1 with one line on
stderr saying why.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from headrace import envs


def check(host: str, port: int, timeout: float, api_key: str | None = None) -> str | None:
    """None when ready, else the reason it is not."""
    base = f"http://{host}:{port}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + "/health"), timeout=timeout):
            pass
        req = urllib.request.Request(base + "/v1/models", headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = json.loads(resp.read()).get("data")
    except urllib.error.HTTPError as exc:
        return f"{exc.url} answered {exc.code}"
    except (OSError, ValueError) as exc:  # refused, timed out, not JSON
        return f"{base} is not answering: {exc}"
    if not isinstance(data, list) or not data:
        return f"{base}/v1/models lists no model"
    return None


def main(host: str, port: int, timeout: float) -> int:
    reason = check(host, port, timeout, envs.api_key())
    if reason is not None:
        print(f"not ready: {reason}", file=sys.stderr)
        return 1
    return 0
