"""bonefrac serve: every endpoint and every refusal, through FastAPI's TestClient, on one tiny calibrated run."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import shutil
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import anyio
import numpy as np
import pydicom
import pytest
import starlette.formparsers
import torch
from fastapi.testclient import TestClient
from PIL import Image
from starlette.requests import Request

from bonefrac import DISCLAIMER
from bonefrac.cli import main
from bonefrac.data.io import read_image
from bonefrac.errors import ImageReadError
from bonefrac.evaluate import evaluate_run
from bonefrac.export import export_onnx
from bonefrac.predict import Predictor
from bonefrac.serve import ServeSettings, create_app
from bonefrac.serve.app import STATIC
from bonefrac.serve.uploads import UploadError, read_form
from bonefrac.shipped import shipped_run
from tests.helpers import bar_image, tiny_fit, write_bar_set, write_dicom

SECRET = "SECRET^PATIENT"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """cnn-small at 32 px, calibrated on val and evaluated on test (so the model card has metrics with CIs)."""
    root = write_bar_set(tmp_path_factory.mktemp("bars") / "set", {"train": 16, "val": 10, "test": 6})
    run_dir = tiny_fit(root, tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs") / "small")
    evaluate_run(run_dir, root, "test", n_resamples=50)
    return run_dir


@pytest.fixture(scope="module")
def client(run) -> TestClient:
    with TestClient(create_app(run)) as test_client:  # the context runs start-up: model warm-up, then ready
        yield test_client


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def xray() -> bytes:
    """A bar 'radiograph' the OOD guard accepts."""
    return png(bar_image(np.random.default_rng(3), True))


def post(client: TestClient, data: bytes, name: str = "x.png", query: str = ""):
    return client.post(f"/v1/predict{query}", files={"file": (name, data, "application/octet-stream")})


def decode_png(b64: str) -> Image.Image:
    data = base64.b64decode(b64)
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data))


# --- health, readiness, model card, page ---------------------------------------------------------------------------


def test_health_and_ready(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["backend"] == "torch"
    assert ready.json()["limits"] == {"max_upload_mb": 50.0, "max_files": 16, "max_body_mb": 200.0, "max_fields": 16,
                                      "max_field_kb": 64.0, "max_request_mpx": 200.0, "max_requests": 8,
                                      "request_timeout_s": 60.0}


def test_not_ready_before_start_up(run):
    response = TestClient(create_app(run)).get("/ready")  # no `with`: start-up (warm-up) has not run
    assert response.status_code == 503 and response.json()["detail"] == "the model is warming up"


def test_model_card_has_metrics_with_cis_and_what_the_threshold_means(client, run):
    card = client.get("/v1/model").json()
    calibration = json.loads((run / "calibration.json").read_text())
    metrics = json.loads((run / "eval" / "test" / "metrics.json").read_text())
    assert card["name"] == "small" and card["model"] == "cnn-small" and card["labels"] == ["fractured", "not_fractured"]
    assert card["threshold"] == calibration["threshold"] and card["operating_point"] == "sensitivity>=0.95"
    chosen = calibration["thresholds"]["sensitivity>=0.95"]
    assert card["threshold_meaning"] == (
        f"chosen for sensitivity ≥ 0.95 on validation (20 files: sensitivity {chosen['sensitivity']:.3f}, "
        f"specificity {chosen['specificity']:.3f})"
    )
    test = card["metrics"]["test"]
    assert test["n_files"] == 12 and test["ci"].startswith("95 % percentile bootstrap")
    auc = test["metrics"]["roc_auc"]
    assert auc["name"] == "ROC AUC" and auc["point"] == metrics["metrics"]["roc_auc"]["point"]
    assert auc["low"] <= auc["point"] <= auc["high"]
    assert card["data"]["counts"]["test"] == {"fractured": 6, "not_fractured": 6}
    assert card["disclaimer"] == DISCLAIMER and "Not a diagnosis" in card["intended_use"]


def test_page_is_served_accessible_and_offline(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert DISCLAIMER in " ".join(html.split()) and "<html lang=\"en\">" in html
    assert '<label for="files">' in html and 'id="drop"' in html and 'tabindex="0"' in html
    assert 'type="range" class="opacity"' in html and 'role="alert"' in html
    for name in ("app.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200
    for path in STATIC.iterdir():  # nothing fetched from elsewhere: the page works offline
        assert not re.search(r"https?://", path.read_text()), path.name


def test_openapi_docs_describe_the_upload(client):
    docs = client.get("/docs")
    assert docs.status_code == 200 and "cdn" not in docs.text.lower()  # served offline (fastapi-offline)
    script = re.search(r'src="([^"]+swagger-ui-bundle\.js)"', docs.text).group(1)
    assert client.get(script).status_code == 200
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) >= {"/v1/predict", "/v1/predict/batch", "/v1/model", "/health", "/ready"}
    body = spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert body["schema"]["properties"]["file"] == {"type": "string", "format": "binary"}


# --- predictions -----------------------------------------------------------------------------------------------------


def test_predict_matches_bonefrac_predict_on_the_same_file(client, run, xray, tmp_path):
    response = post(client, xray)
    assert response.status_code == 200
    answer = response.json()
    (tmp_path / "x.png").write_bytes(xray)
    row = Predictor(run).predict_paths([tmp_path / "x.png"]).rows[0]
    assert answer["probabilities"] == pytest.approx(row.probabilities, abs=1e-6)
    assert answer["prediction"] == row.prediction and answer["accepted"] is True and answer["ood_reason"] == ""
    p, threshold = answer["probability"], answer["threshold"]
    assert p == answer["probabilities"]["fractured"] and sum(answer["probabilities"].values()) == pytest.approx(1)
    assert answer["prediction"] == ("fractured" if p >= threshold else "not_fractured")
    side = "at or above" if p >= threshold else "below"
    assert answer["decision"] == (
        f"{answer['prediction']}: p(fractured) = {p:.3f} is {side} the threshold {threshold:.3f}"
    )
    assert answer["threshold_meaning"].startswith("chosen for sensitivity ≥ 0.95 on validation")
    assert answer["image"] == {"format": "PNG", "width": 48, "height": 48, "truncated": False}
    assert answer["disclaimer"] == DISCLAIMER
    assert "image_png" not in answer and "heatmap" not in answer  # PNGs only when asked for


def test_predict_with_heatmap_returns_image_heatmap_and_overlay(client, xray):
    answer = post(client, xray, query="?heatmap=true").json()
    assert decode_png(answer["image_png"]).size == (48, 48) and decode_png(answer["image_png"]).mode == "L"
    heatmap = answer["heatmap"]
    assert heatmap["method"] == "gradcam" and heatmap["target"] == answer["prediction"]
    layer = decode_png(heatmap["heatmap_png"])
    assert layer.size == (48, 48) and layer.mode == "RGBA"
    assert decode_png(heatmap["overlay_png"]).mode == "RGB"
    assert post(client, xray, query="?image=true").json()["image_png"] == answer["image_png"]


def test_large_images_are_shown_at_display_side(run, xray):
    big = png(Image.open(io.BytesIO(xray)).resize((600, 300)))
    with TestClient(create_app(run, ServeSettings(display_side=100))) as small_display:
        answer = post(small_display, big, query="?heatmap=true").json()
    assert answer["image"]["width"] == 600 and decode_png(answer["image_png"]).size == (100, 50)
    assert decode_png(answer["heatmap"]["heatmap_png"]).size == (100, 50)


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF", "BMP"])
def test_other_formats(client, xray, fmt):
    buffer = io.BytesIO()
    Image.open(io.BytesIO(xray)).save(buffer, format=fmt)
    response = post(client, buffer.getvalue(), name=f"x.{fmt.lower()}")
    assert response.status_code == 200 and response.json()["image"]["format"] == fmt


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".dcm"])
def test_bytes_are_read_exactly_as_the_file(xray, tmp_path, suffix):
    gray = np.asarray(Image.open(io.BytesIO(xray)))
    path = tmp_path / f"x{suffix}"
    if suffix == ".dcm":
        write_dicom(path, gray.astype(np.uint16) * 257, bits_stored=16, preamble=False)  # found by its suffix only
    else:
        Image.fromarray(gray).save(path)
    from_file, info = read_image(path)
    from_bytes, info_bytes = read_image(path.read_bytes(), name=path.name)
    assert np.array_equal(from_file, from_bytes) and info == info_bytes
    with pytest.raises(ImageReadError) as caught:
        read_image(path.read_bytes()[:100], name=path.name)
    assert caught.value.path == path.name


def test_dicom_upload_never_shows_or_logs_a_header_value(client, xray, tmp_path, caplog):
    gray = np.asarray(Image.open(io.BytesIO(xray)))
    path = write_dicom(tmp_path / "scan.dcm", gray.astype(np.uint16) * 257, bits_stored=16,
                       PatientName=SECRET, PatientID="SECRET-ID-42")
    assert pydicom.dcmread(path).PatientName == SECRET
    data = path.read_bytes()
    with caplog.at_level(logging.DEBUG):
        ok = post(client, data, name="scan.dcm", query="?heatmap=true")
        broken = post(client, data[:-500], name="broken.dcm")
    assert ok.status_code == 200 and ok.json()["image"]["format"] == "DICOM"
    assert broken.status_code == 422 and broken.json()["detail"].startswith("truncated DICOM (pixel data has")
    said = ok.text + broken.text + caplog.text
    assert "predicted 1 of 1 files" in caplog.text  # the log line exists, and holds no header value
    assert "SECRET" not in said and "scan.dcm" not in caplog.text


def test_uploads_stay_in_memory_unless_configured(run, xray, tmp_path, monkeypatch):
    big = png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1200), dtype=np.uint8)))
    assert len(big) > 1_000_000  # over Starlette's 1 MB spool limit, past which its form parser writes to disk

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was about to be written to a temporary file")

    for name in ("SpooledTemporaryFile", "NamedTemporaryFile", "TemporaryFile", "mkstemp"):
        monkeypatch.setattr(tempfile, name, no_disk)
    monkeypatch.setattr(starlette.formparsers, "SpooledTemporaryFile", no_disk)  # imported by name there
    with TestClient(create_app(run)) as in_memory:
        assert post(in_memory, big).status_code == 200
    kept = tmp_path / "kept"
    with TestClient(create_app(run, ServeSettings(save_uploads=str(kept)))) as keeping:
        assert post(keeping, xray).status_code == 200
    assert [p.name for p in kept.iterdir()] == [hashlib.sha256(xray).hexdigest() + ".png"]


def test_out_of_distribution_is_200_with_accepted_false_and_the_reason(client):
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG")
    response = post(client, buffer.getvalue(), name="holiday.jpg")  # the colour rule reads the upload's bytes
    assert response.status_code == 200
    answer = response.json()
    assert answer["accepted"] is False and answer["ood_reason"].startswith("colour image:")
    assert answer["decision"] == f"not assessed: the image does not look like a radiograph ({answer['ood_reason']})"
    blank = post(client, png(Image.new("L", (64, 64), 128))).json()
    assert blank["accepted"] is False and blank["ood_reason"].startswith("blank or constant image")


# --- refusals --------------------------------------------------------------------------------------------------------


def test_upload_over_the_size_limit_is_413(run, xray):
    with TestClient(create_app(run, ServeSettings(max_upload_mb=0.001))) as limited:
        response = post(limited, xray + b"\0" * 1000)
        assert response.status_code == 413
        assert response.json()["detail"] == "file 'x.png' is over the upload limit of 0.001 MB"
        declared = limited.post("/v1/predict", content=b"x", headers={
            "content-type": "multipart/form-data; boundary=b", "content-length": "10000000"})
        assert declared.status_code == 413
        assert declared.json()["detail"] == (
            "request body of 10 MB is over the limit of 0.066536 MB (1 × 0.001 MB and part headers)"
        )


def test_the_whole_body_is_capped_form_fields_and_chunked_bodies_included(run, xray):
    with TestClient(create_app(run, ServeSettings(max_body_mb=0.02))) as limited:  # 20 kB
        fields = {f"note{i}": "x" * 5000 for i in range(6)}  # 30 kB of fields, each under the field limit
        response = limited.post("/v1/predict", files={"file": ("x.png", xray)}, data=fields)
        assert response.status_code == 413
        detail = response.json()["detail"]  # declared by its Content-Length: refused before it is read
        assert re.fullmatch(r"request body of 0\.03\d* MB is over the limit of 0\.02 MB \(all parts together\)", detail)

        def chunked_fields():  # no Content-Length: only counting the bytes as they come can stop it
            yield b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
            yield from [b"x" * 4096] * 1000

        chunked = limited.post("/v1/predict", content=chunked_fields(),
                               headers={"content-type": "multipart/form-data; boundary=b"})
        assert chunked.status_code == 413
        assert chunked.json()["detail"] == "request body is over the limit of 0.02 MB (all parts together)"
        assert post(limited, xray).status_code == 200  # a normal upload is under it


def test_a_chunked_body_is_refused_once_past_the_cap_never_buffered_whole():
    scope = {"type": "http", "method": "POST", "path": "/v1/predict",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b")]}  # no content-length: chunked
    pulled = []

    async def receive() -> dict:  # a form field without end: 4 GB if read whole
        pulled.append(1)
        head = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n' if len(pulled) == 1 else b""
        return {"type": "http.request", "body": head + b"x" * 4096, "more_body": True}

    with pytest.raises(UploadError) as caught:
        anyio.run(partial(read_form, Request(scope, receive), max_file_bytes=10**9, max_files=1,
                          max_body_bytes=20_000, max_field_bytes=10**9))
    assert caught.value.status == 413 and caught.value.reason == (
        "request body is over the limit of 0.02 MB (all parts together)")
    assert len(pulled) == 5  # 20,480 bytes: the first chunk past 20,000


def test_too_many_or_too_long_form_fields_are_413(run, xray):
    with TestClient(create_app(run, ServeSettings(max_fields=3, max_field_kb=1))) as limited:
        upload = {"file": ("x.png", xray)}
        many = limited.post("/v1/predict", files=upload, data={f"f{i}": "1" for i in range(4)})
        assert many.status_code == 413 and many.json()["detail"] == "more than 3 form fields in one request"
        long = limited.post("/v1/predict", files=upload, data={"operating_point": "y" * 1001})
        assert long.status_code == 413 and long.json()["detail"] == "a form field is over the limit of 1,000 bytes"
        fine = limited.post("/v1/predict", files=upload, data={"operating_point": "youden", "a": "1", "b": "2"})
        assert fine.status_code == 200 and fine.json()["operating_point"] == "youden"


def test_the_pixels_of_one_request_are_capped_before_decoding(run, xray, monkeypatch):
    width, height = Image.open(io.BytesIO(xray)).size
    budget = 1.5 * width * height / 1e6  # one image fits, two do not
    app = create_app(run, ServeSettings(max_request_mpx=budget))
    decoded = []
    prepare = app.state.service.predictor.prepare
    monkeypatch.setattr(app.state.service.predictor, "prepare", lambda data, **kw: decoded.append(1) or
                        prepare(data, **kw))
    with TestClient(app) as limited:
        assert post(limited, xray).status_code == 200 and len(decoded) == 1
        two = limited.post("/v1/predict/batch", files=[("files", ("a.png", xray)), ("files", ("b.png", xray))])
        assert two.status_code == 413 and len(decoded) == 1  # refused from the headers: nothing decoded
        assert two.json()["detail"] == (f"the images in this request have {2 * width * height / 1e6:.1f} megapixels "
                                        f"together, over the limit of {budget:g} a request; send fewer or smaller "
                                        "images")
        bomb = png(Image.new("L", (4000, 4000)))  # 16 Mpx of zeros: a few kB
        assert len(bomb) < 50_000
        answer = post(limited, bomb)
        assert answer.status_code == 413 and "16.0 megapixels" in answer.json()["detail"] and len(decoded) == 1
        mixed = limited.post("/v1/predict/batch", files=[("files", ("a.png", xray)), ("files", ("n.png", b"no"))])
        assert mixed.status_code == 200 and mixed.json()["n_errors"] == 1  # an unreadable file counts no pixels


@pytest.mark.parametrize(
    ("data", "reason"),
    [(b"name,label\nx.png,fractured\n", "not an image (text file)"),
     (bytes(range(256)) * 4, "not an image (unrecognised content)")],
)
def test_not_an_image_is_415_with_the_reason(client, data, reason):
    response = post(client, data, name="x.png")
    assert response.status_code == 415 and response.json()["detail"] == reason


def test_a_body_that_is_not_multipart_is_415(client, xray):
    response = client.post("/v1/predict", content=xray, headers={"content-type": "image/png"})
    assert response.status_code == 415
    assert response.json()["detail"] == "send the image as multipart/form-data (a part named file), not image/png"


def test_unreadable_or_truncated_image_is_422_with_the_reason(client, xray):
    truncated = post(client, xray[: len(xray) // 2])
    assert truncated.status_code == 422 and truncated.json()["detail"].startswith("truncated PNG")
    empty = post(client, b"")
    assert empty.status_code == 422 and empty.json()["detail"] == "empty file (0 bytes)"
    corrupt = post(client, b"\xff\xd8\xff" + b"\0" * 200, name="x.jpg")
    assert corrupt.status_code == 422 and corrupt.json()["detail"].startswith("corrupt JPEG")
    none = client.post("/v1/predict", data={"note": "no file here"}, files={"other": ("", b"")})
    assert none.status_code == 422
    assert none.json()["detail"] == (
        "no file in the request: send multipart/form-data with the image in a part named file"
    )


def _part(body: bytes) -> bytes:
    return b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n' + body


@pytest.mark.parametrize(
    ("content_type", "body", "status", "reason"),
    [
        ("multipart/form-data", _part(b"abc") + b"\r\n--b--\r\n", 400,
         "malformed multipart body: the Content-Type has no boundary"),
        ("multipart/form-data; boundary=b", b"garbage", 400,
         "malformed multipart body (Expected boundary character 45, got 103 at index 2)"),
        ("multipart/form-data; boundary=b", _part(b"abc"), 400,
         "malformed multipart body: it ends before its closing boundary"),
        ("multipart/form-data; boundary=b", b"--b\r\nno colon here\r\n\r\nabc\r\n--b--\r\n", 400,
         "malformed multipart body (Found invalid character 32 in header at 7)"),
        ("multipart/form-data; boundary=b", b"", 400, "malformed multipart body: it ends before its closing boundary"),
        ("multipart/form-data; boundary=b", b"--b\r\nX-Other: 1\r\n\r\nabc\r\n--b--\r\n", 422,
         "no file in the request: send multipart/form-data with the image in a part named file"),
    ],
)
def test_malformed_multipart_is_never_a_500(client, content_type, body, status, reason):
    response = client.post("/v1/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status and response.json()["detail"] == reason


def test_a_client_that_disconnects_mid_upload_is_a_400_not_a_crash():
    scope = {"type": "http", "method": "POST", "path": "/v1/predict",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b")]}
    messages = iter([{"type": "http.request", "body": _part(b"abc"), "more_body": True}, {"type": "http.disconnect"}])

    async def receive() -> dict:
        return next(messages)

    with pytest.raises(UploadError) as caught:
        anyio.run(partial(read_form, Request(scope, receive), max_file_bytes=1000, max_files=1))
    assert caught.value.status == 400 and caught.value.reason == "the client disconnected before the body was complete"


def test_request_timeout_is_503(run, xray, monkeypatch):
    app = create_app(run, ServeSettings(request_timeout_s=0.2))
    predictor = app.state.service.predictor
    slow = predictor.predict_prepared

    def predict_slowly(images):
        time.sleep(0.6)
        return slow(images)

    monkeypatch.setattr(predictor, "predict_prepared", predict_slowly)
    with TestClient(app) as timed:
        response = post(timed, xray)
        assert response.status_code == 503 and response.headers["retry-after"] == "5"
        assert response.json()["detail"] == "request took longer than 0.2 s; try again later"


def slow_steps(monkeypatch, predictor, seconds: float) -> list[int]:
    """Make each image's model call take `seconds` more; returns the list of image counts each call got."""
    calls: list[int] = []
    fast = predictor.predict_prepared

    def predict_slowly(images):
        calls.append(len(images))
        time.sleep(seconds * len(images))  # the cost of a model call grows with its images
        return fast(images)

    monkeypatch.setattr(predictor, "predict_prepared", predict_slowly)
    return calls


def test_a_timed_out_request_stops_its_work_and_the_next_is_served_in_its_own_time(run, xray, monkeypatch):
    app = create_app(run, ServeSettings(request_timeout_s=2.0))
    calls = slow_steps(monkeypatch, app.state.service.predictor, 0.5)
    with TestClient(app) as timed:
        started = time.monotonic()
        files = [("files", (f"{i}.png", xray)) for i in range(10)]  # 5 s of model calls
        assert timed.post("/v1/predict/batch", files=files).status_code == 503
        next_started = time.monotonic()
        assert next_started - started < 3
        answer = post(timed, xray)  # waits at most for the abandoned request's current step (0.5 s), then its own
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        assert time.monotonic() - next_started < 2.0
    assert sum(calls) <= 6 and calls[-1] == 1  # the batch stopped after at most 5 of its 10 images


def test_requests_beyond_max_requests_get_503_with_retry_after_before_their_body_is_read(run, xray, monkeypatch):
    """One request in the model (slowed), max_requests 1: the next is refused at once, and served once it is free."""
    import threading

    app = create_app(run, ServeSettings(max_requests=1))
    slow_steps(monkeypatch, app.state.service.predictor, 1.0)
    with TestClient(app) as client:
        first: list = []
        worker = threading.Thread(target=lambda: first.append(post(client, xray)))
        worker.start()
        time.sleep(0.4)  # the first request holds the one slot, its image in the model
        started = time.monotonic()
        busy = post(client, xray)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5"
        assert "busy" in busy.json()["detail"] and time.monotonic() - started < 0.5  # no waiting, no body read
        worker.join()
        assert first[0].status_code == 200
        assert post(client, xray).status_code == 200  # the slot is free again
        assert client.get("/ready").json()["limits"]["max_requests"] == 1


def test_a_damaged_dicom_is_422_with_or_without_its_preamble(client, tmp_path):
    """A DICOM without preamble is known by its name alone: damaged, it is 422 like one with a preamble, and the same
    bytes under another name are 415 (no image format)."""
    stored = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    for preamble in (True, False):
        path = write_dicom(tmp_path / f"{preamble}.dcm", stored, preamble=preamble)
        cut = path.read_bytes()[: 200 if preamble else 60]
        answer = client.post("/v1/predict", files={"file": ("view.dcm", cut, "application/dicom")})
        assert answer.status_code == 422, (preamble, answer.json())
    other = client.post("/v1/predict", files={"file": ("view.bin", cut, "application/octet-stream")})
    assert other.status_code == 415


def test_a_bug_is_one_sentence_with_nosniff_and_its_traceback_only_in_the_log(run, xray, monkeypatch, caplog):
    app = create_app(run)

    def broken(*args, **kwargs):
        raise RuntimeError("a bug with /secret/path in its message")

    monkeypatch.setattr(app.state.service, "predict", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = post(client, xray)
    assert answer.status_code == 500 and answer.headers["x-content-type-options"] == "nosniff"
    assert answer.json() == {"detail": "internal error (the server log has the details)"}
    assert "/secret/path" in caplog.text and "Traceback" in caplog.text


def test_work_for_a_client_that_went_away_stops(run, xray, monkeypatch):
    app = create_app(run)
    calls = slow_steps(monkeypatch, app.state.service.predictor, 0.3)
    with TestClient(app):  # start-up: the model warmed up
        pass
    body = (_part(xray) + b"\r\n") * 8 + b"--b--\r\n"  # eight files (read_form takes every part with a file name)
    scope = {"type": "http", "method": "POST", "path": "/v1/predict/batch", "query_string": b"", "headers": [
        (b"content-type", b"multipart/form-data; boundary=b"), (b"host", b"testserver")]}
    sent = []

    async def client_that_leaves() -> None:
        gone = anyio.Event()

        async def receive() -> dict:
            if not sent:
                sent.append("body")
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)

        async with anyio.create_task_group() as group:
            group.start_soon(app, scope, receive, send)
            await anyio.sleep(0.5)  # the first image is in the model
            gone.set()

    anyio.run(client_that_leaves)
    assert sum(calls) <= 3  # of 8 images: the one running, perhaps the next, never the rest
    assert any(m.get("status") == 503 for m in sent if isinstance(m, dict))


def test_the_model_is_loaded_and_called_on_one_model_thread_never_the_event_loop(run, xray, monkeypatch):
    import bonefrac.serve.app as app_module

    threads = []

    class Recording(Predictor):
        def __init__(self, *args, **kwargs):
            threads.append(("load", threading.current_thread()))
            super().__init__(*args, **kwargs)

        def logits(self, batch):
            threads.append(("logits", threading.current_thread()))
            return super().logits(batch)

    monkeypatch.setattr(app_module, "Predictor", Recording)
    with TestClient(create_app(run)) as recorded:  # loads the model, then warms it up
        assert post(recorded, xray, query="?heatmap=true").status_code == 200
    (load, loader), *calls = threads
    assert load == "load" and loader.name.startswith("bonefrac-model") and loader is not threading.main_thread()
    assert [kind for kind, _ in calls] == ["logits", "logits"]  # warm-up, then the request
    assert all(thread is loader for _, thread in calls)


# --- batch -----------------------------------------------------------------------------------------------------------


def test_batch_gives_one_entry_per_file_and_errors_in_place(client, xray):
    other = png(bar_image(np.random.default_rng(4), False))
    files = [("files", ("a.png", xray)), ("files", ("notes.png", b"not an image at all\n")),
             ("files", ("b.png", other))]
    response = client.post("/v1/predict/batch?image=true", files=files)
    assert response.status_code == 200
    answer = response.json()
    assert answer["n_files"] == 3 and answer["n_errors"] == 1 and answer["disclaimer"] == DISCLAIMER
    first, error, last = answer["results"]
    assert error == {"file": "notes.png", "status": "error", "http_status": 415, "error": "not an image (text file)"}
    assert first["file"] == "a.png" and last["file"] == "b.png" and "image_png" in last
    single = post(client, other, name="b.png").json()
    assert last["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)


def test_too_many_files_is_413(run, xray):
    with TestClient(create_app(run, ServeSettings(max_files=2))) as limited:
        files = [("files", (f"{i}.png", xray)) for i in range(3)]
        response = limited.post("/v1/predict/batch", files=files)
        assert response.status_code == 413 and response.json()["detail"] == "more than 2 files in one request"
        single = limited.post("/v1/predict", files=files[:2])
        assert single.status_code == 413 and single.json()["detail"] == "more than 1 file in one request"


# --- backends and the command ----------------------------------------------------------------------------------------


def test_onnx_backend_serves_the_same_probabilities(run, xray, tmp_path):
    exported = tmp_path / "run"
    shutil.copytree(run, exported)
    export_onnx(exported)
    threads = torch.get_num_threads()
    with TestClient(create_app(exported, ServeSettings(backend="onnx"))) as onnx:
        assert onnx.get("/ready").json()["backend"] == "onnx"
        answer = post(onnx, xray, query="?heatmap=true").json()  # Grad-CAM uses the PyTorch copy
    with TestClient(create_app(run)) as torch_client:
        expected = post(torch_client, xray).json()
    assert answer["backend"] == "onnx" and "heatmap_png" in answer["heatmap"]
    assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-4)
    assert torch.get_num_threads() == threads  # one PyTorch thread on the onnx app's model thread, not here


def test_cli_serve_passes_settings_and_refuses_a_missing_run(run, tmp_path, monkeypatch, capsys):
    import bonefrac.serve as serve_module

    calls = []
    monkeypatch.setattr(serve_module, "serve", lambda run_dir, settings, **kw: calls.append((run_dir, settings, kw)))
    assert main(["serve", str(run), "--port", "8123", "--max-upload-mb", "5", "--timeout", "9", "--max-body-mb", "7",
                 "--max-request-mpx", "30"]) == 0
    (run_dir, settings, where), = calls
    assert Path(run_dir) == Path(run) and settings.max_upload_mb == 5 and settings.request_timeout_s == 9
    assert settings.max_body_mb == 7 and settings.max_request_mpx == 30
    assert where == {"host": "127.0.0.1", "port": 8123, "workers": 1, "insecure": False}
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out
    assert main(["serve", "--port", "8125"]) == 0  # no run: the shipped model
    assert calls[-1][0] == shipped_run() and "using the shipped model" in capsys.readouterr().out
    monkeypatch.undo()
    assert main(["serve", str(tmp_path / "missing"), "--port", "8124"]) == 2


# --- authentication (issue 17, item 7) ------------------------------------------------------------------------------


def test_the_api_needs_the_token_when_the_server_has_one(run, xray, caplog):
    token = "correct horse battery staple"
    settings = ServeSettings(token=token)
    assert token not in repr(settings)  # never in a log line or a traceback that shows the settings
    with caplog.at_level(logging.DEBUG), TestClient(create_app(run, settings)) as guarded:
        missing = guarded.get("/v1/model")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="bonefrac"'
        assert missing.json() == {"detail": "this server needs a token: send Authorization: Bearer <token>"}
        for header in ("Bearer wrong", f"Basic {token}", f"Bearer {token}x", "Bearer "):
            wrong = guarded.get("/v1/model", headers={"Authorization": header})
            assert wrong.status_code == 401 and wrong.headers["www-authenticate"].startswith("Bearer realm=")
        assert guarded.get("/v1/model", headers={"Authorization": "Bearer wrong"}).json() == {
            "detail": "the token is not valid"}
        refused = post(guarded, xray)  # refused before the body is read
        assert refused.status_code == 401
        assert guarded.post("/v1/predict/batch", files=[("files", ("a.png", xray))]).status_code == 401
        bearer = {"Authorization": f"Bearer {token}"}
        assert guarded.get("/v1/model", headers=bearer).status_code == 200
        answer = guarded.post("/v1/predict", files={"file": ("x.png", xray)}, headers=bearer)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
        for open_path in ("/health", "/ready", "/", "/static/app.js", "/openapi.json"):  # no model, no patient
            assert guarded.get(open_path).status_code == 200, open_path
    assert token not in caplog.text


def test_serve_refuses_a_network_address_without_a_token(run, tmp_path, monkeypatch, capsys):
    import bonefrac.serve as serve_module
    from bonefrac.errors import BonefracError
    from bonefrac.serve import serve

    monkeypatch.delenv("BONEFRAC_TOKEN", raising=False)
    with pytest.raises(BonefracError, match="--host 0.0.0.0 lets other machines reach the API"):
        serve(run, ServeSettings(), host="0.0.0.0")  # the library refuses too, before uvicorn starts
    calls = []
    monkeypatch.setattr(serve_module, "serve", lambda run_dir, settings, **kw: calls.append((settings, kw)))
    assert main(["serve", str(run), "--host", "0.0.0.0"]) == 2 and not calls
    error = capsys.readouterr().err
    assert "error: --host 0.0.0.0 lets other machines reach the API: give a token (--token-file FILE or " \
           "BONEFRAC_TOKEN), or --insecure to serve without one" in " ".join(error.split())
    assert main(["serve", str(run), "--host", "0.0.0.0", "--insecure"]) == 0
    assert calls[-1][0].token is None and calls[-1][1]["insecure"] is True
    assert "NO authentication" in capsys.readouterr().err
    token_file = tmp_path / "token"
    token_file.write_text("from-the-file\n")
    assert main(["serve", str(run), "--host", "0.0.0.0", "--token-file", str(token_file)]) == 0
    assert calls[-1][0].token == "from-the-file"
    assert "from-the-file" not in "".join(capsys.readouterr())
    monkeypatch.setenv("BONEFRAC_TOKEN", "from-the-environment")
    assert main(["serve", str(run), "--host", "192.168.1.5"]) == 0 and calls[-1][0].token == "from-the-environment"
    assert main(["serve", str(run), "--host", "::1"]) == 0  # loopback: a token is optional
    token_file.write_text("  \n")
    assert main(["serve", str(run), "--token-file", str(token_file)]) == 2  # an empty file is no token
    assert "the file is empty" in capsys.readouterr().err


# --- operating points, the three-level answer and predictive values (issue 16, item 1) ---------------------------


def test_model_card_lists_every_operating_point_with_val_and_test_figures(client, run):
    card = client.get("/v1/model").json()
    calibration = json.loads((run / "calibration.json").read_text())
    on_test = json.loads((run / "eval" / "test" / "metrics.json").read_text())["operating_points"]
    points = {point["name"]: point for point in card["operating_points"]}
    assert list(points) == list(calibration["thresholds"]) and "specificity>=0.95" in points
    for name, point in points.items():
        assert point["threshold"] == calibration["thresholds"][name]["threshold"]
        assert point["val"]["specificity"] == calibration["thresholds"][name]["specificity"]
        assert point["test"]["sensitivity"] == on_test[name]["sensitivity"]  # point, low, high, n
        assert point["in_use"] == (name == "sensitivity>=0.95")
    assert card["levels"] == calibration["levels"]
    assert card["levels_meaning"].startswith(("no fracture below", "no doubt band"))


def test_predict_at_another_operating_point_as_query_or_form_field(client, run, xray):
    youden = json.loads((run / "calibration.json").read_text())["thresholds"]["youden"]
    by_query = post(client, xray, query="?operating_point=youden&heatmap=true").json()
    by_form = client.post("/v1/predict", data={"operating_point": "youden"}, files={"file": ("x.png", xray)}).json()
    for answer in (by_query, by_form):
        assert answer["operating_point"] == "youden" and answer["threshold"] == youden["threshold"]
        assert answer["threshold_meaning"].startswith("chosen to maximise Youden's J")
        assert answer["prediction"] == ("fractured" if answer["probability"] >= youden["threshold"]
                                        else "not_fractured")
    assert by_query["heatmap"]["target"] == by_query["prediction"]  # the heatmap explains the decision asked for
    both = client.post("/v1/predict?operating_point=default", data={"operating_point": "youden"},
                       files={"file": ("x.png", xray)}).json()
    assert both["operating_point"] == "default"  # the query wins over the form field
    given = post(client, xray, query="?threshold=0").json()
    assert given["prediction"] == "fractured" and given["operating_point"] == "threshold given"
    assert given["threshold_meaning"] == "given with the request, not chosen on validation"
    assert post(client, xray).json()["operating_point"] == "sensitivity>=0.95"  # the server's own is untouched


def test_every_answer_has_the_three_level_answer(client, run, xray):
    levels = json.loads((run / "calibration.json").read_text())["levels"]
    low, high = levels["low"]["threshold"], levels["high"]["threshold"]
    answer = post(client, xray, query="?operating_point=youden").json()
    p = answer["probability"]
    assert answer["level"] == ("fracture" if p >= high else "no fracture" if p < low else "doubt")
    assert answer["level_words"].startswith(f"{answer['level']}: p(fractured) = {p:.3f} is ")
    batch = client.post("/v1/predict/batch?threshold=0.5", files=[("files", ("a.png", xray))]).json()
    assert batch["results"][0]["level"] == answer["level"] and batch["results"][0]["threshold"] == 0.5


def test_prevalence_adds_ppv_and_npv(client, run, xray):
    chosen = json.loads((run / "calibration.json").read_text())["thresholds"]["sensitivity>=0.95"]
    values = client.post("/v1/predict", data={"prevalence": "0.2"}, files={"file": ("x.png", xray)}).json()[
        "predictive_values"]
    assert values["prevalence"] == 0.2 and values["operating_point"] == "sensitivity>=0.95"
    assert values["sensitivity"] == chosen["sensitivity"] and values["specificity"] == chosen["specificity"]
    assert post(client, xray).json()["predictive_values"] is None


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("?operating_point=spec99", "operating point 'spec99': this run's calibration.json has default, youden, "
                                    "sensitivity>=0.9, sensitivity>=0.95, specificity>=0.95"),
        ("?threshold=abc", "threshold 'abc': not a number"),
        ("?threshold=1.5", "threshold 1.5: a probability, in [0, 1]"),
        ("?threshold=0.3&operating_point=youden", "give an operating point or a threshold, not both"),
        ("?prevalence=1", "prevalence 1: the share of fractures among the images, strictly between 0 and 1 (e.g. 0.1)"),
        ("?prevalence=0.1&threshold=0.3", "PPV and NPV need the val sensitivity and specificity of an operating "
                                          "point chosen on val; 'threshold given' has none"),
    ],
)
def test_a_decision_parameter_it_cannot_use_is_422_with_the_reason(client, xray, query, reason):
    for path in ("/v1/predict", "/v1/predict/batch"):
        response = client.post(f"{path}{query}", files={"file" if path == "/v1/predict" else "files": ("x.png", xray)})
        assert response.status_code == 422 and response.json() == {"detail": reason}


def test_openapi_docs_describe_the_decision_parameters(client):
    spec = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/predict/batch"):
        names = {parameter["name"] for parameter in spec["paths"][path]["post"]["parameters"]}
        assert names == {"heatmap", "image", "operating_point", "threshold", "prevalence"}


# --- OpenAPI: what /docs promises -------------------------------------------------------------------------------------


def test_openapi_has_a_success_schema_for_every_endpoint_and_documents_the_refusals(client):
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]

    def schema(path: str, method: str, status: str) -> dict:
        found = spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
        return schemas[found["$ref"].rsplit("/", 1)[1]]

    success = {("/v1/predict", "post"): "Prediction", ("/v1/predict/batch", "post"): "Batch",
               ("/v1/model", "get"): "ModelCard", ("/health", "get"): "Health", ("/ready", "get"): "Ready"}
    for (path, method), name in success.items():
        assert schema(path, method, "200")["title"] == name and schema(path, method, "200")["properties"], path
    assert {"probability", "decision", "level", "accepted", "ood_reason", "image"} <= set(schemas["Prediction"]
                                                                                          ["properties"])
    for path in ("/v1/predict", "/v1/predict/batch"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"200", "400", "401", "413", "415", "422", "503"} <= set(responses), path
        for status in ("401", "413", "415", "422", "503"):
            assert schema(path, "post", status)["title"] == "ErrorDetail"
            examples = responses[status]["content"]["application/json"]["examples"]
            assert all(set(example["value"]) == {"detail"} for example in examples.values()), status
    assert schema("/ready", "get", "503")["required"] == ["status", "detail"]


def test_every_answer_matches_its_documented_schema(client, xray):
    """The answers are validated against the models (a field the models lack would vanish): spot-check that the
    full answers survive, and that a refusal of each documented status is {"detail": reason}."""
    answer = post(client, xray, query="?heatmap=true&prevalence=0.2").json()
    assert set(answer["heatmap"]) == {"method", "target", "flat", "heatmap_png", "overlay_png"}
    assert set(answer["predictive_values"]) == {"prevalence", "operating_point", "sensitivity", "specificity",
                                                "ppv", "npv"}
    card = client.get("/v1/model").json()
    assert set(card["operating_points"][0]["test"]["sensitivity"]) >= {"point", "low", "high", "n_files"}
    assert client.post("/v1/predict", content=b"{}", headers={"content-type": "application/json"}).status_code == 415
    refused = client.post("/v1/predict?heatmap=maybe", files={"file": ("x.png", xray)})
    assert refused.status_code == 422
    assert refused.json() == {"detail": "heatmap 'maybe': Input should be a valid boolean, unable to interpret input"}


def test_the_card_names_the_csv_columns_bonefrac_predict_writes(client, run, xray, tmp_path):
    (tmp_path / "x.png").write_bytes(xray)
    assert main(["predict", str(run), str(tmp_path / "x.png"), "--out", str(tmp_path / "p.csv")]) == 0
    header = (tmp_path / "p.csv").read_text().splitlines()[0].split(",")
    assert client.get("/v1/model").json()["csv_columns"] == header
