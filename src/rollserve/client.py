"""`InferenceHTTPClient`: a thin client for one rollserve/SGLang server or router URL.

Sync methods use `requests`; async twins share one lazily created `aiohttp.ClientSession`
(close it with `async with` or `aclose()`; using the client afterwards opens a fresh one).
A session nobody closed is closed when its event loop ends (`asyncio.run` returning), as
its loop closes every async generator it started: no "Unclosed client session" at exit.
`connect_timeout` bounds only the TCP connect: reads are uncapped, since generation can take
arbitrarily long (wrap calls in `asyncio.wait_for` for a deadline).

Requests to loopback addresses never go through proxies from the environment
(`http_proxy` and friends): `trust_env` defaults to False for them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlparse

import aiohttp
import requests

RETRY_STATUSES = (502, 503, 504)


class InferenceHTTPError(RuntimeError):
    """A non-2xx answer: carries the status, the URL and the server's error message."""

    def __init__(self, status: int, url: str, message: str) -> None:
        super().__init__(f"HTTP {status} from {url}: {message}")
        self.status, self.url, self.message = status, url, message


class InferenceHTTPClient:
    def __init__(self, base_url: str, connect_timeout: float = 10.0, *, max_retries: int = 0,
                 retry_backoff: float = 0.5, trust_env: bool | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.retry_backoff = retry_backoff
        self.trust_env = (not _is_loopback(self.base_url)) if trust_env is None else trust_env
        self._http = requests.Session()
        self._http.trust_env = self.trust_env
        self._session: aiohttp.ClientSession | None = None
        # Parked at its yield while the session lives; closing it closes the session.
        self._session_closer: AsyncGenerator[None, None] | None = None

    # ---- sync ------------------------------------------------------------------------

    def generate(self, prompt: str | list[str] | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 sampling_params: dict[str, Any] | None = None, return_logprob: bool = False,
                 **kwargs: Any) -> Any:
        """POST /generate (SGLang native)."""
        return self.post("/generate", _generate_body(prompt, input_ids, sampling_params,
                                                     return_logprob, kwargs))

    def chat_completion(self, messages: list[dict[str, Any]], model: str = "default",
                        **kwargs: Any) -> dict[str, Any]:
        """POST /v1/chat/completions; extra keyword arguments are sent as JSON fields."""
        return self.post("/v1/chat/completions", {"model": model, "messages": messages,
                                                  **kwargs})

    def health(self) -> bool:
        """GET /health; True on 200, False otherwise. Never raises."""
        try:
            response = self._http.get(self.base_url + "/health",
                                      timeout=(self.connect_timeout, self.connect_timeout))
            return response.status_code == 200
        except requests.RequestException:
            return False

    def stream_generate(self, prompt: str | None = None, input_ids: list[int] | None = None,
                        sampling_params: dict[str, Any] | None = None,
                        return_logprob: bool = False, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Yields deltas {"text", "output_ids", "output_token_logprobs", "meta_info"} with only
        what is new since the previous event, decoded from the server's SSE stream."""
        body = _generate_body(prompt, input_ids, sampling_params, return_logprob,
                              {**kwargs, "stream": True})
        url = self.base_url + "/generate"
        with self._http.post(url, json=body, stream=True,
                             timeout=(self.connect_timeout, None)) as response:
            _raise_for(response.status_code, url, response.text if not response.ok else "")
            tracker = _DeltaTracker()
            for line in response.iter_lines():
                event = _sse_event(line)
                if event is not None:
                    yield tracker.delta(event)

    def stream_chat_completion(self, messages: list[dict[str, Any]], model: str = "default",
                               **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Yields the OpenAI `chat.completion.chunk` events (already deltas)."""
        url = self.base_url + "/v1/chat/completions"
        body = {"model": model, "messages": messages, **kwargs, "stream": True}
        with self._http.post(url, json=body, stream=True,
                             timeout=(self.connect_timeout, None)) as response:
            _raise_for(response.status_code, url, response.text if not response.ok else "")
            for line in response.iter_lines():
                event = _sse_event(line)
                if event is not None:
                    yield event

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST a JSON body to any endpoint (e.g. SGLang's admin and weight-update ones) and
        return the decoded answer; a non-2xx answer raises InferenceHTTPError."""
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            try:
                response = self._http.post(url, json=body, timeout=(self.connect_timeout, None))
            except requests.ConnectionError:
                if attempt == self.max_retries:
                    raise
            else:
                if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                    _raise_for(response.status_code, url, response.text)
                    return response.json()
            time.sleep(self.retry_backoff * 2**attempt)
        raise AssertionError("unreachable")

    def get(self, path: str) -> Any:
        """GET any JSON endpoint (e.g. /get_server_info); raises InferenceHTTPError."""
        url = self.base_url + path
        response = self._http.get(url, timeout=(self.connect_timeout, None))
        _raise_for(response.status_code, url, response.text)
        return response.json()

    # ---- async -----------------------------------------------------------------------

    async def async_generate(self, prompt: str | list[str] | None = None,
                             input_ids: list[int] | list[list[int]] | None = None,
                             sampling_params: dict[str, Any] | None = None,
                             return_logprob: bool = False, **kwargs: Any) -> Any:
        return await self._apost("/generate", _generate_body(
            prompt, input_ids, sampling_params, return_logprob, kwargs))

    async def async_chat_completion(self, messages: list[dict[str, Any]],
                                    model: str = "default", **kwargs: Any) -> dict[str, Any]:
        return await self._apost("/v1/chat/completions",
                                 {"model": model, "messages": messages, **kwargs})

    async def async_health(self) -> bool:
        try:
            session = await self._get_session()
            async with session.get(self.base_url + "/health", timeout=aiohttp.ClientTimeout(
                    total=self.connect_timeout)) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def async_stream_generate(
        self, prompt: str | None = None, input_ids: list[int] | None = None,
        sampling_params: dict[str, Any] | None = None, return_logprob: bool = False,
        **kwargs: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        body = _generate_body(prompt, input_ids, sampling_params, return_logprob,
                              {**kwargs, "stream": True})
        url = self.base_url + "/generate"
        async with (await self._get_session()).post(url, json=body) as response:
            if response.status >= 300:
                _raise_for(response.status, url, await response.text())
            tracker = _DeltaTracker()
            async for line in response.content:
                event = _sse_event(line.rstrip(b"\r\n"))
                if event is not None:
                    yield tracker.delta(event)

    async def async_stream_chat_completion(
        self, messages: list[dict[str, Any]], model: str = "default", **kwargs: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        url = self.base_url + "/v1/chat/completions"
        body = {"model": model, "messages": messages, **kwargs, "stream": True}
        async with (await self._get_session()).post(url, json=body) as response:
            if response.status >= 300:
                _raise_for(response.status, url, await response.text())
            async for line in response.content:
                event = _sse_event(line.rstrip(b"\r\n"))
                if event is not None:
                    yield event

    async def _apost(self, path: str, body: dict[str, Any]) -> Any:
        url = self.base_url + path
        for attempt in range(self.max_retries + 1):
            try:
                async with (await self._get_session()).post(url, json=body) as response:
                    text = await response.text()
                    if response.status not in RETRY_STATUSES or attempt == self.max_retries:
                        _raise_for(response.status, url, text)
                        return json.loads(text)
            except aiohttp.ClientConnectionError:
                if attempt == self.max_retries:
                    raise
            await asyncio.sleep(self.retry_backoff * 2**attempt)
        raise AssertionError("unreachable")

    async def async_generate_many(
        self, prompts: list[str] | None = None, input_ids: list[list[int]] | None = None,
        sampling_params: dict[str, Any] | None = None, *, max_concurrency: int = 64,
        progress: bool = False, return_logprob: bool = False, **kwargs: Any,
    ) -> list[Any]:
        """One request per item (routers cannot take batched text), at most
        `max_concurrency` in flight, results in input order. Only `max_concurrency` tasks
        exist at any time, so 100k items cost no more than their results."""
        if (prompts is None) == (input_ids is None):
            raise ValueError("pass exactly one of prompts and input_ids")
        items = prompts if prompts is not None else input_ids
        key = "prompt" if prompts is not None else "input_ids"
        results: list[Any] = [None] * len(items)
        cursor = iter(enumerate(items))
        bar = _progress_bar(len(items)) if progress else None

        async def worker() -> None:
            for index, item in cursor:
                results[index] = await self.async_generate(
                    **{key: item}, sampling_params=sampling_params,
                    return_logprob=return_logprob, **kwargs)
                if bar is not None:
                    bar.update(1)

        try:
            await asyncio.gather(*(worker() for _ in range(max(1, max_concurrency))))
        finally:
            if bar is not None:
                bar.close()
        return results

    def generate_many(self, prompts: list[str] | None = None,
                      input_ids: list[list[int]] | None = None,
                      sampling_params: dict[str, Any] | None = None, **kwargs: Any) -> list[Any]:
        """Sync `async_generate_many` (runs its own event loop; not from inside one)."""

        async def run() -> list[Any]:
            try:
                return await self.async_generate_many(prompts, input_ids, sampling_params,
                                                      **kwargs)
            finally:
                await self.aclose()  # the session belongs to this loop only

        return asyncio.run(run())

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
            connector = aiohttp.TCPConnector(limit=0)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector,
                                                  trust_env=self.trust_env)
            self._session_closer = _close_with_loop(self._session)
            await anext(self._session_closer)
        return self._session

    async def aclose(self) -> None:
        if self._session_closer is not None:
            await self._session_closer.aclose()  # closes the session
        self._session = self._session_closer = None

    async def __aenter__(self) -> InferenceHTTPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def close(self) -> None:
        self._http.close()


async def _close_with_loop(session: aiohttp.ClientSession) -> AsyncGenerator[None, None]:
    """Yields once, then waits to be closed: by `aclose()`, or by the event loop, which closes
    every async generator started in it before it ends (`shutdown_asyncgens`)."""
    try:
        yield
    finally:
        await session.close()


def _generate_body(prompt: Any, input_ids: Any, sampling_params: dict[str, Any] | None,
                   return_logprob: bool, extra: dict[str, Any]) -> dict[str, Any]:
    if (prompt is None) == (input_ids is None):
        raise ValueError("pass exactly one of prompt and input_ids")
    body: dict[str, Any] = {"sampling_params": dict(sampling_params or {}), **extra}
    body["text" if prompt is not None else "input_ids"] = (
        prompt if prompt is not None else input_ids)
    if return_logprob:
        body["return_logprob"] = True
    return body


def _raise_for(status: int, url: str, text: str) -> None:
    if status < 300:
        return
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = text[:500]
    raise InferenceHTTPError(status, url, message)


def _sse_event(line: bytes) -> dict[str, Any] | None:
    if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
        return None
    return json.loads(line[5:])


class _DeltaTracker:
    """Turns SGLang's cumulative stream events into deltas."""

    def __init__(self) -> None:
        self.text_len = self.ids_len = self.logprobs_len = 0

    def delta(self, event: dict[str, Any]) -> dict[str, Any]:
        meta = event.get("meta_info", {})
        logprobs = meta.get("output_token_logprobs") or []
        out = {
            "text": event.get("text", "")[self.text_len:],
            "output_ids": event.get("output_ids", [])[self.ids_len:],
            "output_token_logprobs": logprobs[self.logprobs_len:],
            "meta_info": meta,
        }
        self.text_len = len(event.get("text", ""))
        self.ids_len = len(event.get("output_ids", []))
        self.logprobs_len = len(logprobs)
        return out


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _progress_bar(total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req")
