"""run_host / ``python -m tunedrop.host``: import function_app from a folder, serve, stop on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import httpx

from tests.host.conftest import wait_for
from tunedrop.azurite import PROJECT_ROOT, free_port

APP = textwrap.dedent('''
    import os
    import azure.functions as func

    app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)

    @app.route(route="greeting")
    def greeting(req: func.HttpRequest) -> str:
        return os.environ["GREETING"]
''')


def test_serves_a_function_app_folder_until_sigterm(tmp_path):
    (tmp_path / "function_app.py").write_text(APP)
    (tmp_path / "local.settings.json").write_text(json.dumps({"Values": {"GREETING": "hello from settings"}}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "GREETING"}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    process = subprocess.Popen([sys.executable, "-m", "tunedrop.host", "--root", str(tmp_path), "--port", str(port),
                                "--state-dir", str(tmp_path / "state")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def answered():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/api/greeting")
            except httpx.TransportError:
                return None

        assert wait_for(answered, timeout=20).text == "hello from settings"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "greeting: [ALL]" in output and "Executed 'Functions.greeting' (Succeeded" in output and "Host stopped." in output
    assert (tmp_path / "state" / "host_keys.json").exists()
