"""`bonefrac serve`: a run's model behind a REST API (FastAPI) and one offline web page (static/).

    create_app(run_dir, ServeSettings(...))   the app: POST /v1/predict, POST /v1/predict/batch, GET /v1/model,
                                              GET /health, GET /ready, the page at /, OpenAPI docs at /docs
    serve(run_dir, settings, host=..., port=..., workers=...)   run it under uvicorn
"""

from bonefrac.serve.app import ServeSettings, create_app, serve

__all__ = ["ServeSettings", "create_app", "serve"]
