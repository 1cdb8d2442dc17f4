"""`vitlora serve` on LitServe: one base model, many adapters, requests for any of them batched together.

The LitAPI decodes each request in the inference worker (a bad one becomes an error answer
for that request alone, never an exception that would fail its batch-mates), classifies a
whole mixed batch with one pass of the shared trunk (:meth:`AdapterRegistry.classify`), and
answers per request. The same process serves the web page, the adapter list and the admin
endpoints on LitServe's FastAPI app.
"""

import asyncio
import base64
import multiprocessing
import os
import re
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import litserve as ls
import torch
from fastapi import FastAPI, Header
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt
from starlette.exceptions import HTTPException

from vitlora.adapter import AdapterError, read_adapter
from vitlora.datasets import eval_transform
from vitlora.serving.limits import Limits, RequestError, check_top_k, decode_image
from vitlora.serving.registry import (
    SYNC_INTERVAL_S,
    AdapterRegistry,
    BaseSpec,
    SharedCatalog,
    adapter_files,
    adapter_name,
)

ADMIN_TOKEN_ENV = "VITLORA_ADMIN_TOKEN"
ADMIN_WAIT_S = 120.0
PAGE = Path(__file__).with_name("page.html")
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")


class PredictRequest(BaseModel):
    """``POST /predict``: an image file's bytes in base64, classified by one adapter.

    New optional fields go here with a default, so old clients keep working. ``explain`` adds the
    explanation sheet (``vitlora explain``'s PNG: where the evidence lies, with and without the
    adapter's update) as base64 in ``explanation_png``; it takes seconds per image on a CPU.
    """

    model_config = ConfigDict(extra="forbid")
    adapter: str
    image: str
    top_k: StrictInt = 5
    explain: StrictBool = False


class AddAdapterRequest(BaseModel):
    """``POST /adapters``: a file on the server's disk; its name defaults to the file's stem."""

    model_config = ConfigDict(extra="forbid")
    path: str
    name: str | None = None


@dataclass
class Job:
    """One decoded request: the image tensor, or the error to answer with."""

    adapter: str
    top_k: int
    image: torch.Tensor | None = None
    error: RequestError | None = None
    picture: Image.Image | None = None  # kept for an explanation


@dataclass(frozen=True)
class ServeConfig:
    """Everything `vitlora serve` takes from its command line."""

    sources: tuple[str, ...]
    weights: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 32
    batch_timeout: float = 0.01
    workers: int = 1
    accelerator: str = "auto"
    limits: Limits = field(default_factory=Limits)
    admin_token: str | None = None


class AdapterAPI(ls.LitAPI):
    """Mixed-adapter image classification: one request is one image for one adapter."""

    def __init__(
        self, catalog: SharedCatalog, base: BaseSpec, limits: Limits, max_batch_size: int, batch_timeout: float
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/predict")
        self.catalog, self.base, self.limits = catalog, base, limits

    def setup(self, device: str) -> None:
        self.registry = AdapterRegistry(self.base, device)
        self.transform = eval_transform(self.base.model_name, self.base.model_kwargs.get("img_size"))
        for name, message in self.registry.apply(self.catalog.wanted()).items():
            print(f"vitlora serve: refused adapter {name!r}: {message}", file=sys.stderr)
        threading.Thread(target=self.catalog.follow, args=(self.registry,), daemon=True).start()

    def health(self) -> bool:
        return self.catalog.reports() is not None

    def decode_request(self, request: PredictRequest) -> Job:
        try:
            top_k = check_top_k(request.top_k, self.limits)
            picture = decode_image(request.image, self.limits)
            return Job(request.adapter, top_k, self.transform(picture), picture=picture if request.explain else None)
        except RequestError as error:
            return Job(request.adapter, 1, error=error)

    def batch(self, jobs: list[Job]) -> list[Job]:
        return jobs

    def predict(self, jobs: list[Job] | Job) -> list[tuple[str, Any]] | tuple[str, Any]:
        if isinstance(jobs, Job):  # --max-batch-size 1: LitServe's unbatched loop
            return self._classify([jobs])[0]
        return self._classify(jobs)

    def unbatch(self, outputs: list) -> list:
        return outputs

    def encode_response(self, output: tuple[str, Any]):  # no annotation: LitServe would make it a response model
        name, result, *explanation = output
        if isinstance(result, RequestError):
            return error_response(result.status, str(result))
        answer = {"adapter": name, "predictions": [{"label": label, "probability": p} for label, p in result]}
        if explanation:
            answer["explanation_png"] = base64.b64encode(explanation[0]).decode()
        return answer

    def _classify(self, jobs: list[Job]) -> list[tuple[str, Any]]:
        """Every decoded image in one mixed batch; the others keep their errors."""
        good = [job for job in jobs if job.error is None]
        results = iter(
            self.registry.classify([j.image for j in good], [j.adapter for j in good], [j.top_k for j in good])
            if good
            else []
        )
        answers = [(job.adapter, job.error if job.error is not None else next(results)) for job in jobs]
        return [
            (*answer, self.registry.explain(job.adapter, job.picture))
            if job.picture is not None and not isinstance(answer[1], RequestError)
            else answer
            for job, answer in zip(jobs, answers, strict=True)
        ]


def error_response(status: int, message: str) -> JSONResponse:
    """The one-line JSON every refusal gets: ``{"error": "..."}``."""
    return JSONResponse(status_code=status, content={"error": " ".join(message.split())})


def _validation_message(error: RequestValidationError) -> str:
    problems = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
        problems.append(f"{where}: {problem.get('msg', 'invalid')}")
    return "; ".join(problems)


class AdminEndpoints:
    """``POST /adapters`` and ``DELETE /adapters/{name}``: off without a token, and requiring it."""

    def __init__(self, catalog: SharedCatalog, token: str | None) -> None:
        self.catalog, self.token = catalog, token

    def authorize(self, authorization: str | None) -> None:
        if not self.token:
            raise RequestError(
                403, f"the admin endpoints are off: start vitlora serve with --admin-token or {ADMIN_TOKEN_ENV}"
            )
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.encode(), self.token.encode()):
            raise RequestError(401, "admin endpoints need the header 'Authorization: Bearer <admin token>'")

    async def add(self, body: AddAdapterRequest, authorization: str | None = Header(None)) -> dict[str, Any]:
        self.authorize(authorization)
        name = body.name or adapter_name(body.path)
        if not _ADAPTER_NAME.fullmatch(name):
            raise RequestError(400, f"adapter names are letters, digits, '_' and '-'; got {name!r}")
        path = Path(body.path).resolve()
        if not path.is_file():
            raise RequestError(404, f"{body.path}: no such file on the server")
        if name in self.catalog.loaded():
            raise RequestError(409, f"an adapter named {name!r} is already loaded: remove it first")
        reports = await self._settled(self.catalog.change(name, str(path)))
        refusal = next((report["refused"][name] for report in reports if name in report["refused"]), None)
        if refusal is not None:
            self.catalog.change(name, None)
            raise RequestError(422, refusal)
        return reports[0]["adapters"][name]

    async def remove(self, name: str, authorization: str | None = Header(None)) -> dict[str, str]:
        self.authorize(authorization)
        if name not in self.catalog.wanted():
            raise RequestError(404, f"unknown adapter {name!r}: loaded are {sorted(self.catalog.loaded())}")
        await self._settled(self.catalog.change(name, None))
        return {"removed": name}

    async def _settled(self, version: int) -> list[dict[str, Any]]:
        """Every worker's report once all have applied ``version``."""
        deadline = time.monotonic() + ADMIN_WAIT_S
        while (reports := self.catalog.reports(version)) is None:
            if time.monotonic() > deadline:
                raise RequestError(504, f"the inference workers did not apply the change within {ADMIN_WAIT_S:g} s")
            await asyncio.sleep(SYNC_INTERVAL_S)
        return reports


def add_routes(app: FastAPI, catalog: SharedCatalog, admin_token: str | None) -> None:
    """The page, the adapter list, statistics and admin endpoints; every error as one-line JSON."""
    page = PAGE.read_text()
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) != "/"]

    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    async def adapters() -> dict[str, Any]:
        reports = catalog.reports() or []
        refused = {name: message for report in reports for name, message in report["refused"].items()}
        return {"adapters": list(catalog.loaded().values()), "refused": refused}

    async def stats() -> dict[str, Any]:
        return {"workers": [report["stats"] for report in catalog.reports() or []]}

    admin = AdminEndpoints(catalog, admin_token)
    app.add_api_route("/", index, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/adapters", adapters, methods=["GET"])
    app.add_api_route("/stats", stats, methods=["GET"])
    app.add_api_route("/adapters", admin.add, methods=["POST"])
    app.add_api_route("/adapters/{name}", admin.remove, methods=["DELETE"])

    async def refused(_, error: RequestError) -> JSONResponse:
        return error_response(error.status, str(error))

    async def invalid(_, error: RequestValidationError) -> JSONResponse:
        return error_response(422, _validation_message(error))

    async def http_error(_, error: HTTPException) -> JSONResponse:
        return error_response(error.status_code, str(error.detail))

    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)


def base_of(files: dict[str, str], weights: str | None) -> BaseSpec:
    """The base of the first adapter file that reads; the server refuses to start when none does."""
    problems = []
    for path in files.values():
        try:
            return BaseSpec.of(read_adapter(path), weights)
        except AdapterError as error:
            problems.append(str(error))
    raise ValueError("no adapter file could be read: " + "; ".join(problems))


def build_server(config: ServeConfig, catalog: SharedCatalog, base: BaseSpec) -> ls.LitServer:
    """The LitServer for ``config``; ``catalog`` learns how many inference workers it will have."""
    api = AdapterAPI(catalog, base, config.limits, config.max_batch_size, config.batch_timeout)
    server = ls.LitServer(
        api,
        accelerator=config.accelerator,
        workers_per_device=config.workers,
        max_payload_size=config.limits.max_body_bytes,
        timeout=60,
    )
    catalog.workers = len(server.devices) * config.workers
    add_routes(server.app, catalog, config.admin_token or os.environ.get(ADMIN_TOKEN_ENV))
    return server


def serve(config: ServeConfig) -> None:
    """Serves the adapters of ``config.sources`` until interrupted.

    Raises:
        ValueError: no adapter file, none readable, or base weights that cannot be loaded
            (WeightsUnavailable when they cannot be fetched).
    """
    files = adapter_files(config.sources)
    base = base_of(files, config.weights)
    base.build()  # fails here, naming the weights file, rather than in a worker
    with multiprocessing.Manager() as manager:
        catalog = SharedCatalog(manager, files, workers=1)
        server = build_server(config, catalog, base)
        print(
            f"vitlora serve: {len(files)} adapter files on {base.model_name}, "
            f"http://{config.host}:{config.port}/ (the page), POST /predict, GET /adapters",
            flush=True,
        )
        server.run(host=config.host, port=config.port, generate_client_file=False, log_level="warning")
