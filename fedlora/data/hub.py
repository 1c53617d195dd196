"""Hugging Face hub data sets (`data.source = "hf:OWNER/NAME"`, config in `data.hf_config`).

Without a network, `datasets.load_dataset` retries for about 24 s before it gives up with an
error about the wrong thing. So the hub's address (or the HTTPS proxy's) is probed first, for
at most a few seconds: unreachable, the run is refused at once, naming the id and what to do.
With HF_HUB_OFFLINE=1 nothing is probed and `datasets` reads its local cache (a copy of the
data set downloaded earlier) or fails at once.
"""

from __future__ import annotations

import socket
import threading
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from fedlora.config import ConfigError, DataConfig
from fedlora.data.files import root_cause

if TYPE_CHECKING:
    import datasets

PROBE_SECONDS = 3.0


def load_hub_dataset(config: DataConfig) -> datasets.DatasetDict:
    """Every split of the configured hub data set; ConfigError, fast, when it cannot be had."""
    import datasets

    dataset_id = config.hf_dataset_id
    assert dataset_id is not None, "load_hub_dataset needs an hf: source"
    named = config.source + (f" (config {config.hf_config!r})" if config.hf_config else "")
    local_copy = "or give data.source a local copy (a .parquet / .csv / .jsonl / .json file or a save_to_disk folder)"
    offline = datasets.config.HF_HUB_OFFLINE
    if not offline and not hub_reachable():
        raise ConfigError(
            f"data.source: {named} needs the network, and the Hugging Face hub ({hub_address()[0]}) cannot be reached "
            f"from here; set HF_HUB_OFFLINE=1 to use a copy in the local cache, {local_copy}"
        )
    try:
        loaded = datasets.load_dataset(dataset_id, config.hf_config)
    except Exception as err:  # the hub and the builders raise many types: report them all the same way
        if offline:
            raise ConfigError(
                f"data.source: {named} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                f"it needs the network, {local_copy}"
            ) from None
        raise ConfigError(f"data.source: cannot load {named}: {root_cause(err)}") from None
    if not isinstance(loaded, datasets.DatasetDict):  # data sets without splits come back as one table
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded


def hub_address() -> tuple[str, int]:
    """Host and port a hub request connects to first: the HTTPS proxy if one is set, else the endpoint."""
    from huggingface_hub import constants

    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    host = endpoint.hostname or "huggingface.co"
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(host):
        endpoint = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = endpoint.hostname or host
    return host, endpoint.port or (443 if endpoint.scheme == "https" else 80)


def hub_reachable(timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to the hub (or the proxy) opens within `timeout` seconds.

    The connection runs in a thread because name resolution ignores socket timeouts and can
    hang for much longer than `timeout` on a machine without a network.
    """
    outcome: list[bool] = []
    probe = threading.Thread(target=lambda: outcome.append(_connects(timeout)), daemon=True, name="hub-probe")
    probe.start()
    probe.join(timeout)
    return bool(outcome) and outcome[0]


def _connects(timeout: float) -> bool:
    try:
        with socket.create_connection(hub_address(), timeout=timeout):
            return True
    except OSError:
        return False
