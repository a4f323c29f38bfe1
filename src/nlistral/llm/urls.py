"""Where requests and keys may go: loopback requests never through a proxy, a key only where it was meant to go.

- `session_for(url)`: a requests Session; for a loopback URL (localhost, 127.0.0.0/8, ::1) one that ignores the proxy
  variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY): requests honours them even for 127.0.0.1 when NO_PROXY is unset,
  which sent a local server's prompts, readiness probes and any key to the proxy.
- `key_refusal(api_key_env, url)`: why the key in `api_key_env` must not be sent to `url`, or None. Never over plain
  http:// to another machine; a provider's own variable (MISTRAL_API_KEY, OPENAI_API_KEY) only to that provider's
  API host (or this machine's loopback); any other variable, one the user set for this server, wherever it points.
"""

import ipaddress
from urllib.parse import urlsplit

import requests

PROVIDER_HOSTS = {"MISTRAL_API_KEY": "api.mistral.ai", "OPENAI_API_KEY": "api.openai.com"}


def is_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def session_for(url: str) -> requests.Session:
    session = requests.Session()
    if is_loopback(url):
        session.trust_env = False  # no proxy variables (nor .netrc) for this machine's own servers
    return session


def key_refusal(api_key_env: str, url: str) -> str | None:
    if is_loopback(url):
        return None
    parts = urlsplit(url)
    if parts.scheme != "https":
        return (f"{url} is plain {parts.scheme}:// to another machine: the key in {api_key_env} would cross the "
                "network readable by anyone on the way; use https://, or no key (api_key_env: null)")  # fmt: skip
    home = PROVIDER_HOSTS.get(api_key_env)
    if home and parts.hostname != home:
        return (f"{api_key_env} holds {home}'s key, and {url} is not {home}: set api_key_env to a variable holding "
                "this server's own key, or null for none")  # fmt: skip
    return None
