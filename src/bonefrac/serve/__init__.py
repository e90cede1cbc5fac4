"""`bonefrac serve`: a run's model behind a REST API (FastAPI) and one offline web page (static/).

    create_app(run_dir, ServeSettings(...))   the app: POST /v1/predict, /v1/predict/batch, /v1/dicom/sr,
                                              GET /v1/model, /health, /ready, the page at /, OpenAPI docs at /docs
    serve(run_dir, settings, host=..., port=..., workers=...)   run it under uvicorn

`ServeSettings` (serve/settings.py) loads nothing heavy; the app (FastAPI, torch) is imported on first use, so that
the CLI can build its options from the settings' defaults without it.
"""

from bonefrac.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve"):
        from bonefrac.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'bonefrac.serve' has no attribute {name!r}")
