"""The HTTP API and the page: a run's Predictor behind FastAPI, for one image at a time or a few.

    create_app(run_dir, settings)   the FastAPI app; the model is loaded once, here, and warmed up at start-up
    serve(run_dir, settings, host, port, workers)   run it under uvicorn (what `bonefrac serve` calls)

Every upload goes the way `bonefrac predict` takes a file (Predictor.prepare -> predict_prepared: read, OOD verdict,
letterbox, logits, temperature, threshold), from bytes in memory. A request may ask for another of the run's
val-chosen operating points or a threshold, and for PPV and NPV at a prevalence (`operating_point`, `threshold`,
`prevalence`, as query or form fields), checked as `bonefrac predict` checks them (Calibration.at,
Calibration.predictive_values); the model stays the one loaded (Predictor.at).

The model is loaded and every model call runs on the app's own `settings.inference_threads` worker threads (one by
default), never on the event loop: on a small CPU, more parallel model calls only fight over the cores (PyTorch and
onnxruntime already use all of them for one batch), so requests queue instead, and the request timeout bounds how
long one may wait. Loading the model on the thread that runs it matters: with the model loaded on the main thread,
PyTorch inference on a worker thread took 1.7x as long on a 2-core machine (docs/SERVE.md).

What the client gets for a bad request, always as {"detail": reason}: 413 for an upload over a limit (a file, the
whole body, the form fields, the pixels of a request: ServeSettings), 415
for a body or a file that is not an image, 422 for an image that cannot be read (truncated, corrupt), a request
without a file or a decision parameter it cannot use, 400 for a malformed multipart body, 503 for a request over the
time limit, 401 for an /v1/ request without the server's token (settings.token; serve/auth.py). An image that does
not look like a radiograph is not an error: 200 with accepted = false and the reason.
Uploads stay in memory unless `settings.save_uploads` names a folder, and nothing read from a file (DICOM header
values included) is logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from PIL import Image

from bonefrac import DISCLAIMER, __version__
from bonefrac.calibration import DOUBT, FRACTURE, NO_FRACTURE
from bonefrac.data.io import DICOM_SUFFIXES, probe_image, sniff_format
from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.explain import Explainer, gray_uint8, heatmap_rgba, overlay_rgb, png_bytes
from bonefrac.predict import BACKENDS, PredictionRow, Predictor, PreparedImage
from bonefrac.serve.auth import TokenGuard, check_exposure
from bonefrac.serve.card import model_card, threshold_meaning
from bonefrac.serve.hosts import NOSNIFF, HostGuard, allowed_hosts
from bonefrac.serve.schemas import ERROR_RESPONSES, NOT_READY, Batch, Health, ModelCard, Prediction, Ready
from bonefrac.serve.settings import ServeSettings
from bonefrac.serve.slow_clients import HeaderDeadline
from bonefrac.serve.uploads import Admission, TimeoutMiddleware, Upload, UploadError, read_form

STATIC = Path(__file__).parent / "static"
ENVIRONMENT_KEY = "BONEFRAC_SERVE"  # how `bonefrac serve --workers N` hands the run and settings to each worker
log = logging.getLogger("bonefrac.serve")
T = TypeVar("T")


# --- what one image gives --------------------------------------------------------------------------------------------


def _b64_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def _fit(array: np.ndarray, side: int) -> np.ndarray:
    """Shrink a float (H, W) map so that its longer side is at most `side` (the page has no use for more)."""
    image = Image.fromarray(array, mode="F")
    image.thumbnail((side, side), Image.Resampling.BILINEAR)  # keeps the aspect ratio, never enlarges
    return np.asarray(image, dtype=np.float32)


def decision_words(row: PredictionRow, positive: str) -> str:
    """The decision as a sentence: the class, and the probability against the threshold that decided it."""
    if not row.accepted:
        return f"not assessed: the image does not look like a radiograph ({row.ood_reason})"
    if row.threshold is None:
        return f"{row.prediction}: the most probable class (p = {row.probabilities[row.prediction]:.3f})"
    p = row.probabilities[positive]
    side = "at or above" if p >= row.threshold else "below"
    return f"{row.prediction}: p({positive}) = {p:.3f} is {side} the threshold {row.threshold:.3f}"


def level_words(row: PredictionRow, levels: dict | None, positive: str) -> str | None:
    """The three-level answer as a sentence: the level, and the val-chosen thresholds p falls between."""
    if row.level is None or levels is None:
        return None
    low, high = (f"{levels[side]['threshold']:.3f} ({levels[side]['operating_point']})" for side in ("low", "high"))
    where = {FRACTURE: f"at or above {high}", NO_FRACTURE: f"below {low}", DOUBT: f"between {low} and {high}"}
    return f"{row.level}: p({positive}) = {row.probabilities[positive]:.3f} is {where[row.level]}"


DECISION_FIELDS = ("operating_point", "threshold", "prevalence")  # what a request may ask of the decision


def _number(name: str, text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        raise HTTPException(422, f"{name} {text!r}: not a number") from None


class Service:
    """The loaded model with what the endpoints need around it: the explainer, the model card, the settings."""

    def __init__(self, run_dir: str | Path, settings: ServeSettings):
        if settings.backend not in BACKENDS:
            raise BonefracError(f"backend {settings.backend!r}: choose from {', '.join(BACKENDS)}")
        self.settings = settings
        self.predictor = Predictor(run_dir, backend=settings.backend, allow_truncated=settings.allow_truncated)
        if self.predictor.backend_note:
            log.warning(self.predictor.backend_note)
        if self.predictor.backend == "onnx":
            # onnxruntime runs the model; PyTorch only preprocesses (and draws heatmaps). Its OpenMP threads, spinning
            # after each preprocessing op, took the cores from onnxruntime's: 25-34 ms a request on 2 cores against
            # 17-19 ms with one PyTorch thread on this (the model) thread; heatmaps were not slower (docs/SERVE.md).
            torch.set_num_threads(1)
        self.explainer = Explainer(self.predictor, method=settings.heatmap_method)
        self.card = model_card(self.predictor)
        self.ready = False

    def warm_up(self) -> None:
        """One prediction on a blank image, so the first user does not pay for lazy initialisation."""
        p = self.predictor
        p.logits(p.run.preprocessing(np.zeros((p.image_size, p.image_size), np.float32))[None])
        self.ready = True

    def prepare(self, upload: Upload) -> PreparedImage:
        """Read, judge and preprocess one upload; an unreadable one raises UploadError 415 or 422 with the reason."""
        try:
            image = self.predictor.prepare(upload.data, name=upload.name)
        except ImageReadError as err:
            raise UploadError(_unreadable_status(upload.data, upload.name), err.reason) from err
        # The network has its tensor; what is kept of the pixels is what the page shows (and Grad-CAM reads).
        image.pixels = _fit(image.pixels, self.settings.display_side)
        if self.settings.save_uploads:
            folder = Path(self.settings.save_uploads)
            folder.mkdir(parents=True, exist_ok=True)
            suffix = "." + image.info.format.lower()
            (folder / (hashlib.sha256(upload.data).hexdigest() + suffix)).write_bytes(upload.data)
        return image

    def check_pixels(self, uploads: list[Upload]) -> None:
        """413 when the images of one request have more pixels together than settings.max_request_mpx, read from
        their headers before anything is decoded (a 200 kB PNG may decode to 100 Mpx); an unreadable file counts
        nothing here and gets its own error."""
        total = 0
        for upload in uploads:
            try:
                info = probe_image(upload.data, name=upload.name)
            except ImageReadError:
                continue
            total += info.width * info.height
        limit = self.settings.max_request_mpx
        if total > limit * 1e6:
            raise UploadError(413, f"the images in this request have {total / 1e6:.1f} megapixels together, over "
                                   f"the limit of {limit:g} a request; send fewer or smaller images")

    def decider(self, asked: Mapping[str, str | None]) -> tuple[Predictor, dict | None]:
        """The predictor at the operating point or threshold a request asks for, and PPV and NPV at its prevalence
        (None when not asked); 422 with the reason for what `bonefrac predict` would refuse too."""
        try:
            predictor = self.predictor.at(operating_point=asked.get("operating_point") or None,
                                          threshold=_number("threshold", asked.get("threshold")))
            prevalence = _number("prevalence", asked.get("prevalence"))
            return predictor, None if prevalence is None else predictor.run.calibration.predictive_values(prevalence)
        except BonefracError as err:
            raise HTTPException(422, str(err)) from None

    def result(self, image: PreparedImage, row: PredictionRow, *, heatmap: bool, show_image: bool,
               predictor: Predictor, predictive_values: dict | None) -> dict:
        """One image's JSON: probabilities, decision and its threshold, the three-level answer, OOD verdict, PPV and
        NPV when asked for, and the PNGs asked for."""
        positive = predictor.labels[predictor.positive]
        calibration = predictor.run.calibration
        result = {
            "file": image.file,
            "status": "ok",
            "accepted": row.accepted,
            "ood_score": row.ood_score,
            "ood_reason": row.ood_reason,
            "probabilities": row.probabilities,
            "positive_label": self.predictor.run.positive_label,
            "probability": row.probabilities[positive] if row.threshold is not None else None,
            "prediction": row.prediction,
            "decision": decision_words(row, positive),
            "threshold": row.threshold,
            "operating_point": row.operating_point,
            "threshold_meaning": threshold_meaning(calibration),
            "level": row.level,
            "level_words": level_words(row, calibration.levels, positive),
            "predictive_values": predictive_values,
            "image": {"format": image.info.format, "width": image.info.width, "height": image.info.height,
                      "truncated": image.info.truncated},
            "backend": predictor.backend,
            "disclaimer": DISCLAIMER,
        } | ({} if row.boxes is None else {"boxes": row.boxes})
        shown = image.pixels  # at most display_side already (prepare)
        if show_image or heatmap:
            result["image_png"] = _b64_png(gray_uint8(shown))
        if heatmap:
            # Grad-CAM of the image as shown: the map is drawn at that size anyway, and a 100 Mpx upload would
            # otherwise hold full-size gradients and a full-size heatmap (+1.6 GB measured).
            explanation = self.explainer.explain(shown, target=row.prediction)  # the decision asked for
            pixels, heat = shown, explanation.heatmap
            result["heatmap"] = {
                "method": explanation.method,
                "target": explanation.target,
                "flat": explanation.flat,
                "heatmap_png": _b64_png(heatmap_rgba(heat)),
                "overlay_png": _b64_png(overlay_rgb(pixels, heat)),
            }
        return result

    def predict(self, uploads: list[Upload], *, heatmap: bool, show_image: bool, predictor: Predictor | None = None,
                predictive_values: dict | None = None, stopped: Callable[[], bool] = lambda: False) -> list[dict]:
        """Every upload's result (an error entry for an unreadable one), decided by `predictor` (what `decider` gave;
        the run's own operating point by default).

        One image at a time, read, through the model and explained before the next is read: only one image's pixels
        are held, and `stopped()` (the request timed out, or its client went away) is asked before every step, so
        abandoned work ends after at most one step (one image's reading, its model call, or its Grad-CAM) and the
        model thread is free for the next request. Raises WorkCancelled when stopped.
        """
        predictor = predictor or self.predictor
        self.check_pixels(uploads)

        def step() -> None:
            if stopped():
                raise WorkCancelled

        results = []
        for upload in uploads:
            step()
            try:
                image = self.prepare(upload)
            except UploadError as err:
                results.append({"file": upload.name, "status": "error", "http_status": err.status,
                                "error": err.reason})
                continue
            step()
            (row,) = predictor.predict_prepared([image])
            step()  # before the image's PNG and its Grad-CAM, the slowest step
            results.append(self.result(image, row, heatmap=heatmap, show_image=show_image, predictor=predictor,
                                       predictive_values=predictive_values))
        return results


    def study_report(self, uploads: list[Upload], *, predictor: Predictor,
                     stopped: Callable[[], bool] = lambda: False) -> bytes:
        """The DICOM Structured Report (bonefrac.dicom_sr) of one study from its DICOM images, as a file's bytes:
        what `bonefrac predict --dicom-out` writes for that study. 415 for a file that is not DICOM, 422 when the
        files do not name one study; an image that cannot be decoded or is out of distribution is 'not assessed'."""
        from bonefrac.dicom_sr import build_study_report, dicom_header, image_finding, report_bytes

        self.check_pixels(uploads)
        headers, rows = [], []
        for upload in uploads:
            if stopped():
                raise WorkCancelled
            header, reason = dicom_header(upload.data)
            if header is None:
                status = 415 if reason.startswith("not a DICOM") else 422
                raise UploadError(status, f"{upload.name}: {reason}")
            try:
                (row,) = predictor.predict_prepared([self.prepare(upload)])
            except UploadError as err:
                row = PredictionRow(upload.name, "error", {}, "", predictor.threshold, predictor.operating_point,
                                    err.reason)
            headers.append(header)
            rows.append(row)
        if len({str(header.StudyInstanceUID) for header in headers}) != 1:
            raise UploadError(422, "the files name more than one DICOM study (StudyInstanceUID): send one study's "
                                   "images per request")
        findings = [image_finding(row, predictor.run.positive_label) for row in rows]
        return report_bytes(build_study_report(headers, findings, predictor.run))


class WorkCancelled(Exception):
    """The request a model call was for timed out or lost its client: the call stops before its next step."""


async def _watch_disconnect(request: Request, stop: threading.Event) -> None:
    """Set `stop` when the client disconnects. Called once the body has been read: the server's next message is then
    http.disconnect, when the client goes away or once the answer has been sent."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    stop.set()


def _unreadable_status(data: bytes, name: str = "") -> int:
    """415 when the bytes are no image format at all, 422 when they claim one but cannot be read: by their content,
    or by a DICOM name (a DICOM without preamble is known by nothing else, so a damaged one is 422 like the others)."""
    try:
        if Path(name).suffix.lower() in DICOM_SUFFIXES:
            return 422
        return 422 if sniff_format(data) is not None else 415
    except ImageReadError:  # empty
        return 422


def _log_result(results: list[dict], size: int, seconds: float) -> None:
    """One line per request: counts, bytes and time only (never a file name or anything read from a file)."""
    ok = sum(r["status"] == "ok" for r in results)
    log.info("predicted %d of %d files, %d bytes, %.0f ms", ok, len(results), size, seconds * 1000)


# --- the app ---------------------------------------------------------------------------------------------------------

def _multipart_body(field: str, schema: dict) -> dict:
    """The OpenAPI request body of an upload endpoint: /docs then offers a file picker for `field`."""
    form = {"type": "object", "properties": {field: schema}, "required": [field]}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}}}


FILE = {"type": "string", "format": "binary"}
UPLOAD_BODY = _multipart_body("file", FILE)
BATCH_BODY = _multipart_body("files", {"type": "array", "items": FILE})


def create_app(run_dir: str | Path, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app for one run: the model is loaded here, once; start-up warms it up and then /ready says so."""
    settings = settings or ServeSettings()
    # The model threads: the model is loaded on one of them and every call into it (warm-up, predictions, heatmaps)
    # runs there; at most inference_threads at a time, the rest wait in the executor's queue.
    model_threads = ThreadPoolExecutor(settings.inference_threads, thread_name_prefix="bonefrac-model")
    service = model_threads.submit(Service, run_dir, settings).result()
    admission = Admission(settings.max_requests)

    async def on_model_thread(call: Callable[[], T]) -> T:
        # A request cancelled by the timeout while its call still waits in the queue takes the call out of it;
        # a call already running stops at its next step (Service.predict's `stopped`).
        return await asyncio.get_running_loop().run_in_executor(model_threads, call)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await on_model_thread(service.warm_up)
        log.info("bonefrac serve: %s ready (%s backend)", service.card["name"], service.predictor.backend)
        yield

    # fastapi-offline serves Swagger UI and ReDoc from the package instead of a CDN: /docs works without internet.
    app = FastAPIOffline(
        title="bonefrac",
        version=__version__,
        description=f"Fracture classification of bone radiographs. {DISCLAIMER}",
        lifespan=lifespan,
    )
    app.state.service = service
    app.add_middleware(TimeoutMiddleware, seconds=settings.request_timeout_s)
    app.add_middleware(TokenGuard, token=settings.token)  # before the body is read, outside the timeout
    app.add_middleware(HostGuard, allowed=settings.allowed_hosts)  # added last: outside the timeout, so its 503 too

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, err: UploadError) -> JSONResponse:
        return JSONResponse({"detail": err.reason}, status_code=err.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        # A bug, not the user's input: the traceback goes to the server log, the client gets one sentence. Starlette
        # sends this answer from outside every middleware, so it carries its own nosniff header.
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=err)
        return JSONResponse({"detail": "internal error (the server log has the details)"}, status_code=500,
                            headers=dict(NOSNIFF))

    @app.exception_handler(RequestValidationError)
    async def invalid_parameter(request: Request, err: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 (a query parameter of the wrong type) in the one shape every refusal has: a sentence.
        said = "; ".join(f"{' '.join(map(str, e['loc'][1:])) or e['loc'][0]} {e.get('input')!r}: {e['msg']}"
                         for e in err.errors())
        return JSONResponse({"detail": said}, status_code=422)

    async def cancellable(request: Request, work: Callable[[Callable[[], bool]], T]) -> T:
        """work(stopped) on the model thread. The work asks `stopped` before each step: true once the client goes
        away (the watcher) or the timeout cancels this request (finally), so that abandoned work does not hold the
        thread the next request needs."""
        stop = threading.Event()
        watcher = asyncio.ensure_future(_watch_disconnect(request, stop))
        try:
            return await on_model_thread(lambda: work(stop.is_set))
        except WorkCancelled:
            raise UploadError(503, "the client went away; the request was dropped") from None
        finally:
            stop.set()
            watcher.cancel()

    async def run_predictions(request: Request, max_files: int, heatmap: bool, image: bool,
                              query: dict[str, str | None]) -> list[dict]:
        with admission.slot():
            return await _run_predictions(request, max_files, heatmap, image, query)

    async def _run_predictions(request: Request, max_files: int, heatmap: bool, image: bool,
                               query: dict[str, str | None]) -> list[dict]:
        started = time.perf_counter()
        form = await read_form(request, max_files=max_files, **settings.form_limits)
        # The query wins over a form field of the same name; the decision is checked before the model runs.
        asked = {name: form.fields.get(name) for name in DECISION_FIELDS} | {k: v for k, v in query.items() if v}
        predictor, values = service.decider(asked)
        results = await cancellable(request, lambda stopped: service.predict(
            form.uploads, heatmap=heatmap, show_image=image, predictor=predictor, predictive_values=values,
            stopped=stopped))
        _log_result(results, sum(len(u.data) for u in form.uploads), time.perf_counter() - started)
        return results

    heatmap_query = Query(False, description="add the Grad-CAM heatmap (a PNG layer and an overlay); costs a "
                                             "backward pass")
    image_query = Query(False, description="add the image itself as a PNG (the browser cannot show DICOM)")
    point_query = Query(None, description="decide at another operating point the run chose on val (GET /v1/model "
                                          "lists them: youden, sensitivity>=0.95, specificity>=0.95, ...); also a "
                                          "form field")
    threshold_query = Query(None, description="decide at p(positive) >= this probability instead (not chosen on "
                                              "val); also a form field")
    prevalence_query = Query(None, description="add PPV and NPV at this share of fractures, 0 < P < 1, from the "
                                               "operating point's val sensitivity and specificity; also a form field")

    # exclude_unset: the PNGs appear in an answer only when asked for, never as nulls.
    @app.post("/v1/predict", openapi_extra=UPLOAD_BODY, summary="Predict one image (multipart part `file`)",
              response_model=Prediction, response_model_exclude_unset=True, responses=ERROR_RESPONSES)
    async def predict(request: Request, heatmap: bool = heatmap_query, image: bool = image_query,
                      operating_point: str | None = point_query, threshold: str | None = threshold_query,
                      prevalence: str | None = prevalence_query) -> dict:
        query = {"operating_point": operating_point, "threshold": threshold, "prevalence": prevalence}
        results = await run_predictions(request, 1, heatmap, image, query)
        result = results[0]
        if result["status"] == "error":
            raise UploadError(result["http_status"], result["error"])
        return result

    @app.post("/v1/predict/batch", openapi_extra=BATCH_BODY,
              summary=f"Predict several images (parts `files`, at most {settings.max_files})",
              response_model=Batch, response_model_exclude_unset=True, responses=ERROR_RESPONSES)
    async def predict_batch(request: Request, heatmap: bool = heatmap_query, image: bool = image_query,
                            operating_point: str | None = point_query, threshold: str | None = threshold_query,
                            prevalence: str | None = prevalence_query) -> dict:
        query = {"operating_point": operating_point, "threshold": threshold, "prevalence": prevalence}
        results = await run_predictions(request, settings.max_files, heatmap, image, query)
        errors = sum(r["status"] == "error" for r in results)
        return {"results": results, "n_files": len(results), "n_errors": errors, "disclaimer": DISCLAIMER}

    @app.post("/v1/dicom/sr", openapi_extra=BATCH_BODY, response_class=Response,
              summary=f"A DICOM Structured Report of one study (parts `files`: its DICOM images, at most "
                      f"{settings.max_files})",
              responses={200: {"content": {"application/dicom": {}},
                               "description": "the SR: filed in the images' study, with each image's finding and "
                                              "the study's (docs/PACS.md)"},
                         **ERROR_RESPONSES})
    async def dicom_report(request: Request, operating_point: str | None = point_query,
                           threshold: str | None = threshold_query) -> Response:
        if not service.predictor.run.binary:
            raise UploadError(422, "DICOM results need a binary run (fracture suspected or not)")
        with admission.slot():
            form = await read_form(request, max_files=settings.max_files, **settings.form_limits)
            asked = {name: form.fields.get(name) for name in DECISION_FIELDS} | {
                k: v for k, v in {"operating_point": operating_point, "threshold": threshold}.items() if v}
            predictor, _ = service.decider(asked)
            data = await cancellable(request, lambda stopped: service.study_report(
                form.uploads, predictor=predictor, stopped=stopped))
        return Response(data, media_type="application/dicom",
                        headers={"Content-Disposition": 'attachment; filename="SR.dcm"'})

    @app.get("/v1/model", summary="The model card: name, labels, threshold, metrics with 95% CIs, data",
             response_model=ModelCard, responses={401: ERROR_RESPONSES[401]})
    async def model() -> dict:
        return service.card

    @app.get("/health", summary="Liveness: the process answers", response_model=Health)
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model is loaded and warmed up", response_model=Ready,
             responses=NOT_READY)
    async def ready() -> dict | JSONResponse:
        if not service.ready:
            return JSONResponse({"status": "loading", "detail": "the model is warming up"}, status_code=503)
        return {"status": "ready", "model": service.card["name"], "backend": service.predictor.backend,
                "limits": {"max_upload_mb": settings.max_upload_mb, "max_files": settings.max_files,
                           "max_body_mb": settings.max_body_mb, "max_fields": settings.max_fields,
                           "max_field_kb": settings.max_field_kb, "max_request_mpx": settings.max_request_mpx,
                           "max_requests": settings.max_requests, "request_timeout_s": settings.request_timeout_s}}

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        # Everything the page needs comes from this server: it works offline, and the policy says so.
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'"
        })

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# --- running it ------------------------------------------------------------------------------------------------------


def app_from_environment() -> FastAPI:
    """uvicorn's factory for `--workers N`: each worker process builds its own app from what `serve` put in
    BONEFRAC_SERVE (the run directory and the settings as JSON)."""
    handed = json.loads(os.environ[ENVIRONMENT_KEY])
    settings = handed["settings"]
    if settings.get("allowed_hosts") is not None:  # JSON made the tuple a list
        settings["allowed_hosts"] = tuple(settings["allowed_hosts"])
    return create_app(handed["run_dir"], ServeSettings(**settings))


def serve(run_dir: str | Path, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
          workers: int = 1, insecure: bool = False) -> None:
    """Run the app under uvicorn until interrupted; several workers are processes, each with its own model.

    Refuses (BonefracError) to listen on a non-loopback address without `settings.token`, unless `insecure`.
    """
    import uvicorn

    check_exposure(host, settings.token, insecure)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    settings = replace(settings, allowed_hosts=allowed_hosts(host, settings.allowed_hosts or ()))
    if workers == 1:
        uvicorn.run(create_app(run_dir, settings), host=host, port=port, log_level="info", http=HeaderDeadline)
        return
    Predictor(run_dir, backend=settings.backend)  # fail here, once, with a clear error, not in every worker
    os.environ[ENVIRONMENT_KEY] = json.dumps({"run_dir": str(Path(run_dir).resolve()), "settings": asdict(settings)})
    uvicorn.run("bonefrac.serve.app:app_from_environment", factory=True, host=host, port=port, workers=workers,
                log_level="info", http=HeaderDeadline)
