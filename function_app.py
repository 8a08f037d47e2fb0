"""The Function App: create it and register one blueprint per module in functions/. Nothing else.

Importing this module must stay light (no torch, transformers, peft, mlflow or azure.ai.ml):
each of those costs seconds of cold start. Handlers import what they need when they run.
"""

import azure.functions as func

from functions import ingest, job_events, notify, openai_api, runs, score, status_page, sweeper

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

for module in (ingest, job_events, sweeper, score, runs, openai_api, status_page, notify):
    app.register_functions(module.bp)
