"""The real `sglang-router`: its arguments as a config block, and its worker-registration API.

`router_flags` turns a `router:` config mapping into `sglang_router.launch_router` flags and
checks them with the router's own parser before anything starts. `RouterAPI` talks to a
running router: register a worker and wait until the router reports it healthy, unregister,
list. All traffic is internal, so proxies from the environment are never used.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import requests

from rollserve.utils.process import command_flags

# RouterArgs fields whose command-line flag is not `--<field-name>`.
_FLAG_ALIASES = {
    "prefill_urls": "--prefill",
    "decode_urls": "--decode",
    "server_cert_path": "--tls-cert-path",
    "server_key_path": "--tls-key-path",
}


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print and exit
        raise ValueError(f"invalid router arguments: {message}")


def _router_parser() -> argparse.ArgumentParser:
    from sglang_router.router_args import RouterArgs

    parser = _RaisingParser(prog="sglang_router.launch_router", add_help=False)
    RouterArgs.add_cli_args(parser)
    return parser


def router_fields() -> list[str]:
    from sglang_router.router_args import RouterArgs

    return [field.name for field in dataclasses.fields(RouterArgs)]


def router_flags(router: Mapping[str, Any]) -> list[str]:
    """`{policy: cache_aware, log_level: warn}` -> `["--policy", "cache_aware", ...]`.

    Keys must be `RouterArgs` fields: an unknown key raises ValueError listing every valid
    field. Booleans become bare flags, lists repeated values, dicts `key=value` values, and
    None is dropped. The result is parsed by the router's own parser, so a bad value fails
    here rather than in a process that is already starting.
    """
    valid = router_fields()
    unknown = sorted(set(router) - set(valid))
    if unknown:
        raise ValueError(f"unknown router argument(s) {', '.join(unknown)}; valid RouterArgs "
                         f"fields: {', '.join(valid)}")
    parser = _router_parser()
    options = {action.dest: action.option_strings[-1] for action in parser._actions
               if action.option_strings}
    flags: list[str] = []
    for key, value in router.items():
        flag = _FLAG_ALIASES.get(key) or options.get(key)
        if flag is None:
            raise ValueError(f"router argument {key!r} cannot be set from the command line")
        if isinstance(value, Mapping):
            value = [f"{k}={v}" for k, v in value.items()]
        flags += command_flags({flag: value})
    parser.parse_args(flags)
    return flags


class RouterAPI:
    """Worker registration on a running sglang-router (0.3.x `/workers` API)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self._http = requests.Session()
        self._http.trust_env = False  # internal traffic: never through a proxy

    def is_up(self) -> bool:
        try:
            return self._http.get(self.url + "/workers", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def workers(self) -> list[dict[str, Any]]:
        answer = self._http.get(self.url + "/workers", timeout=10)
        answer.raise_for_status()
        return answer.json().get("workers", [])

    def register(self, worker_url: str, timeout: float = 120.0) -> str:
        """Adds the worker and blocks until the router reports it healthy; returns its id."""
        answer = self._http.post(self.url + "/workers", json={"url": worker_url}, timeout=30)
        if answer.status_code not in (200, 202):
            raise RuntimeError(f"router refused worker {worker_url}: {answer.status_code} "
                               f"{answer.text[:500]}")
        worker_id = answer.json().get("worker_id") or self._worker_id(worker_url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self._http.get(f"{self.url}/workers/{worker_id}", timeout=10)
            if info.status_code == 200 and info.json().get("is_healthy"):
                return worker_id
            time.sleep(0.2)
        self._http.delete(f"{self.url}/workers/{worker_id}", timeout=30)  # not half-added
        raise TimeoutError(f"router did not report worker {worker_url} healthy in {timeout}s")

    def unregister(self, worker_url: str) -> None:
        worker_id = self._worker_id(worker_url)
        answer = self._http.delete(f"{self.url}/workers/{worker_id}", timeout=30)
        if answer.status_code not in (200, 202, 204):
            raise RuntimeError(f"router refused to remove {worker_url}: {answer.status_code} "
                               f"{answer.text[:500]}")
        deadline = time.monotonic() + 30
        while any(w.get("url") == worker_url for w in self.workers()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"router still lists {worker_url} after removal")
            time.sleep(0.1)

    def _worker_id(self, worker_url: str) -> str:
        for worker in self.workers():
            if worker.get("url") == worker_url:
                return worker["id"]
        raise KeyError(f"the router has no worker {worker_url}")
