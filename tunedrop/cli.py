"""The `tunedrop` command. Errors become messages (and exit codes) here, nowhere else."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import click

from tunedrop.local import PROJECT_ROOT


def _settings():
    from shared.settings import Settings, SettingsError

    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


def _client():
    from tunedrop.client import ApiClient

    return ApiClient(state_dir=_settings().state_dir)


def _api(call):
    from tunedrop.client import ApiError

    try:
        return call()
    except ApiError as exc:
        raise click.ClickException(str(exc)) from None


def _override_metadata(overrides: tuple[str, ...]) -> dict[str, str]:
    """`--set KEY=VALUE` options as the blob metadata they become."""
    from shared.intake import OVERRIDE_PREFIX

    metadata = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: use KEY=VALUE.", param_hint="--set")
        metadata[f"{OVERRIDE_PREFIX}{key.strip()}"] = value.strip()
    return metadata


def _dataset_files(file: Path) -> tuple[Path, Path | None]:
    """(train or single file, test half or None): a pair half brings its partner when it is beside it."""
    from shared.datasets import pair_half

    half = pair_half(file.as_posix())
    if half is None:
        return file, None
    partner = next((Path(p) for p in half.partner_names() if Path(p).is_file()), None)
    if partner is None:
        click.echo(f"Note: {file} is half of a train/test pair and {half.partner_hint} is not there; "
                   "the run waits for it once dropped.", err=True)
        return file, None
    return (file, partner) if half.half == "train" else (partner, file)


SET_HELP = "Training parameter for this dataset only, e.g. --set num_train_epochs=1 (repeatable)."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tunedrop")
def cli():
    """tunedrop: drop a chat dataset into a container, get a fine-tuned model answering over HTTP.

    Locally everything runs on this machine: Azurite for storage, a local Functions host,
    LoRA fine-tunes of SmolLM2, MLflow, local model servers. Start it with `tunedrop up`.
    """


@cli.command()
@click.option("--port", default=7071, show_default=True, help="Port of the local Functions host.")
@click.option("-v", "--verbose", is_flag=True, help="Log every function invocation.")
def up(port: int, verbose: bool):
    """Start Azurite (if none is running) and the local Functions host, until Ctrl-C."""
    import logging

    from tunedrop.azurite import Azurite, AzuriteError
    from tunedrop.host import LocalHost, load_app
    from tunedrop.local import embedded_environment

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("tunedrop").setLevel(logging.INFO)
    if not verbose:  # a successful invocation every few seconds (the sweeper's) says nothing; failures still show
        logging.getLogger("tunedrop.host.invocations").setLevel(logging.ERROR)
    settings = _settings()
    state_dir = settings.state_dir.resolve()
    azurite = Azurite.default_running()
    try:
        if azurite is None:
            azurite = Azurite.start(state_dir / "azurite", ports=(10000, 10001, 10002),
                                    log_file=state_dir / "azurite.log")
            click.echo(f"Azurite started (data in {state_dir / 'azurite'}).")
        else:
            click.echo("Using the Azurite already listening on 10000-10002.")
    except AzuriteError as exc:
        raise click.ClickException(str(exc)) from None
    env = embedded_environment(azurite.connection_string, state_dir=state_dir, port=port)
    os.environ.update(env)
    app = load_app("function_app", PROJECT_ROOT)  # as the Functions worker loads it
    host = LocalHost(app, environ=env, port=port, root=PROJECT_ROOT, state_dir=state_dir)
    host.start()
    click.echo(f"Functions host on http://127.0.0.1:{port} ({len(app.get_functions())} functions).")
    click.echo(f"OpenAI-compatible API: base_url http://127.0.0.1:{port}/api/v1, api_key from `tunedrop keys local`.")
    click.echo(f"Status page: http://127.0.0.1:{port}/api/status#key={host.function_key}")
    click.echo("Drop a dataset: tunedrop drop FILE   |   follow it: tunedrop status   |   Ctrl-C stops.")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the same way on SIGTERM as on Ctrl-C
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        host.stop()
        if azurite.process:
            azurite.stop()
        servers = list((state_dir / "endpoints").glob("*/endpoint.json"))
        if servers:
            click.echo(f"{len(servers)} endpoint(s) left running, as they would be in Azure: the sweeper tears them "
                       f"down after {settings.idle_minutes:g} idle minutes once `tunedrop up` runs again.")


@cli.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", help="Blob name in the training container (default: the file's name).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--wait", is_flag=True, help="Follow the run until it serves (or stops), with a progress bar.")
@click.option("--timeout", "timeout_s", default=3600.0, show_default=True, help="With --wait: give up after seconds.")
def drop(file: Path, name: str | None, overrides: tuple[str, ...], wait: bool, timeout_s: float):
    """Upload FILE into the training container; prints the run id it becomes.

    A sidecar FILE.tunedrop.json beside it goes up first. Half of a train/test pair
    (NAME.train.jsonl + NAME.test.jsonl, or DIR/train.jsonl + DIR/test.jsonl) brings its other
    half: the test half goes up first, so that the run starts as the train half arrives.
    """

    from shared.datasets import pair_half
    from shared.intake import SIDECAR_SUFFIX
    from shared.runs import run_id_for
    from shared.storage import default_storage

    if "TUNEDROP_STORAGE" not in os.environ and not any(k.startswith("TUNEDROP_STORAGE__") for k in os.environ):
        from shared.settings import AZURITE_CONNECTION_STRING
        from tunedrop.azurite import port_open

        os.environ["TUNEDROP_STORAGE"] = AZURITE_CONNECTION_STRING
        if not port_open(10000):  # else the storage SDK retries a refused connection for over a minute
            raise click.ClickException("Nothing answers on 127.0.0.1:10000 (Azurite, the local storage): start the "
                                       "app first with `tunedrop up`, or set TUNEDROP_STORAGE to your storage account.")
    settings = _settings()
    metadata = _override_metadata(overrides)
    train, test = _dataset_files(file)
    dropped = pair_half(file.as_posix())
    # A folder pair keeps its folder in the blob names (DIR/train.jsonl); anything else drops as its file name.
    blob_name = name or (f"{file.parent.name}/{file.name}" if dropped and dropped.stem.endswith("/") else file.name)
    names = {file: blob_name}
    if test is not None:
        half = pair_half(blob_name)
        if half is None:
            raise click.BadParameter(f"{blob_name!r} does not name half of a pair, so its other half would not be "
                                     f"found: end it in .{dropped.half}{dropped.suffix}.", param_hint="--name")
        partner = test if file == train else train
        names[partner] = half.stem + half.other + pair_half(partner.as_posix()).suffix
    from azure.core.exceptions import AzureError

    try:
        container = default_storage().ensure_container(settings.training_container)
    except AzureError as exc:
        raise click.ClickException(f"The storage does not answer ({type(exc).__name__}): is `tunedrop up` running, "
                                   "or TUNEDROP_STORAGE right?") from None

    def upload(path: Path, blob: str, meta=None):
        with open(path, "rb") as handle:
            result = container.get_blob_client(blob).upload_blob(handle, overwrite=True, metadata=meta or None)
        click.echo(f"Dropped {path} as {settings.training_container}/{blob}.")
        return result

    sidecar = train.with_name(train.name + SIDECAR_SUFFIX)
    if sidecar.is_file():
        upload(sidecar, names[train] + SIDECAR_SUFFIX)
    if test is not None:
        upload(test, names[test])
    result = upload(train, names[train], metadata)
    run_id = run_id_for(settings.training_container, names[train], result["etag"])
    if not wait:
        click.echo(f"Run id: {run_id}   (follow it: tunedrop status {run_id})")
        return
    click.echo(f"Run id: {run_id}")
    _wait_for(run_id, timeout_s)


def _wait_for(run_id: str, timeout_s: float) -> None:
    """Follow the run to its end; exit 0 deployed, 1 stopped (rejected, failed, canceled, gated), 2 timed out."""
    from tunedrop.follow import follow

    client = _client()
    try:
        run = _api(lambda: follow(client, run_id, click.echo, interactive=sys.stdout.isatty(), timeout_s=timeout_s))
    except TimeoutError as exc:
        click.echo(f"Still going: {exc}. Follow it with `tunedrop status {run_id}`.", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo(f"\nStopped following; the run goes on: tunedrop status {run_id}", err=True)
        sys.exit(130)
    if run["state"] == "deployed":
        gate = run.get("gate") or {}
        if gate.get("measured"):
            from shared.pipeline.gate import describe

            click.echo(describe(gate))
        click.echo(f"Deployed: {run['model_name']}:{run['model_version']} on endpoint {run['endpoint_name']}.")
        click.echo(f"Ask it:   tunedrop score {run_id} \"What is the capital of Italy?\"")
        click.echo(f"Or with any OpenAI client: base_url {client.base_url}/api/v1, model \"{run_id}\", "
                   "api_key from `tunedrop keys local`.")
        return
    if run["state"] == "registered":
        from shared.pipeline.gate import describe

        click.echo(f"Held back: {describe(run.get('gate') or {})}. Deploy it anyway: tunedrop deploy {run_id} --force")
    else:
        click.echo(f"Run {run['state']}: {run.get('error') or '(no error recorded)'}", err=True)
    sys.exit(1)


@cli.command()
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON.")
def status(run_id: str | None, as_json: bool):
    """Show one run, or list all runs."""
    client = _client()
    if run_id:
        run = _api(lambda: client.run(run_id))
        if as_json:
            click.echo(json.dumps(run, indent=2))
            return
        click.echo(f"{_shown(run['run_id'])}: {run['state']}")
        if run["state"] in ("received", "validating", "submitted", "running", "deploying"):
            from shared.pipeline.progress import describe as describe_progress

            click.echo(f"  now: {describe_progress(_api(lambda: client.progress(run_id)))}")
        for key in ("dataset_blob", "job_name", "model_name", "model_version", "endpoint_name", "error"):
            if run.get(key):
                click.echo(f"  {key}: " + "\n    ".join(_shown(line) for line in str(run[key]).split("\n")))
        if run.get("metrics"):
            click.echo("  metrics: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in sorted(run["metrics"].items())))
        if run.get("gate"):
            from shared.pipeline.gate import describe

            click.echo(f"  {describe(run['gate'])}")
        for entry in run.get("history", []):
            click.echo(f"  {entry['at']}  {entry['state']}")
        return
    runs = _api(client.runs)
    if as_json:
        click.echo(json.dumps(runs, indent=2))
        return
    if not runs:
        click.echo("No runs yet: drop a dataset with `tunedrop drop FILE`.")
    for run in runs:
        line = f"{run['run_id']:<40} {run['state']:<11} {_shown(run['dataset_blob'])}"
        if run["state"] in ("rejected", "failed", "canceled") and run.get("error"):
            line += f"  ({_brief(run['error'])})"
        elif run.get("gate") and not run["gate"].get("passed") and not run["gate"].get("forced_by"):
            from shared.pipeline.gate import describe

            line += f"  ({describe(run['gate'])})"
        click.echo(line)


def _shown(text) -> str:
    """Text from a run record as one safe line: a blob name may hold control characters (escaped, as repr does)."""
    text = str(text)
    return text if text.isprintable() else repr(text)[1:-1]


def _brief(error: str, limit: int = 100) -> str:
    first = _shown(str(error).split("\n")[0])
    return first if len(first) <= limit else first[:limit - 3] + "..."


@cli.command()
@click.argument("run_id")
@click.argument("prompt")
@click.option("--system", help="A system message to put first.")
@click.option("--max-new-tokens", default=200, show_default=True)
@click.option("--temperature", default=0.6, show_default=True)
@click.option("--top-p", default=0.9, show_default=True)
def score(run_id: str, prompt: str, system: str | None, max_new_tokens: int, temperature: float, top_p: float):
    """Ask RUN's fine-tuned model PROMPT through the score function."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    client = _client()
    answer = _api(lambda: client.score(run_id, messages, temperature=temperature, top_p=top_p,
                                       do_sample=temperature > 0, max_new_tokens=max_new_tokens))
    click.echo(answer.get("output", json.dumps(answer)))


@cli.command()
@click.argument("run_id")
def retry(run_id: str):
    """Carry a failed or canceled run on from where it stopped (a new job, registration or deployment again)."""
    client = _client()
    run = _api(lambda: client.retry(run_id))
    click.echo(f"{run['run_id']}: {run['state']} (retry {run['retries']})")


@cli.command()
@click.argument("run_id")
@click.option("--force", is_flag=True, help="Deploy a model the quality gate held back (the override is recorded).")
def deploy(run_id: str, force: bool):
    """Wake a sleeping (torn-down) run, or deploy a gated one with --force; it serves once its endpoint is ready."""
    client = _client()
    run = _api(lambda: client.deploy(run_id, force))
    click.echo(f"{run['run_id']}: {run['state']} (cycle {run.get('cycle', 0)}, endpoint {run.get('endpoint_name')})")


@cli.command()
@click.argument("run_id")
def undeploy(run_id: str):
    """Put a deployed run to sleep now: its endpoint is deleted, its model stays; a score or `deploy` wakes it."""
    client = _client()
    run = _api(lambda: client.undeploy(run_id))
    click.echo(f"{run['run_id']}: {run['state']}")


@cli.command()
@click.argument("run_id")
def cancel(run_id: str):
    """Stop a run wherever it is before it serves: validation, training (the job is cancelled) or deploying
    (the endpoint is deleted). The dataset stays; `tunedrop retry RUN_ID` carries it on later."""
    client = _client()
    run = _api(lambda: client.cancel(run_id))
    click.echo(f"{run['run_id']}: {run['state']} (was {run.get('failed_in') or '?'})")


@cli.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")
@click.option("--min-examples", type=int, help="Fewest valid examples accepted (default: TUNEDROP_MIN_EXAMPLES).")
@click.option("--tokens/--no-tokens", default=None,
              help="Count tokens per example (default: TUNEDROP_COUNT_TOKENS); --no-tokens is a quicker check.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Training parameter to check with, as `drop --set` sets it (repeatable).")
def validate(file: Path, as_json: bool, min_examples: int | None, tokens: bool | None, overrides: tuple[str, ...]):
    """Check a dataset (.jsonl, .jsonl.gz, .parquet) as the ingest function would.

    Reads the overrides the run would get (a sidecar FILE.tunedrop.json beside it, then --set),
    and checks half of a train/test pair together with its other half when that is beside it.
    Exit 0 accepted, 1 rejected, 2 unreadable.
    """
    import contextlib
    import dataclasses

    from shared.datasets import check_dataset
    from shared.intake import SIDECAR_SUFFIX

    settings = _settings()
    if tokens is not None:
        settings = dataclasses.replace(settings, count_tokens=tokens)
    metadata = _override_metadata(overrides)
    train, test = _dataset_files(file)
    sidecar = train.with_name(train.name + SIDECAR_SUFFIX)

    def chunks(handle):
        return iter(lambda: handle.read(1 << 20), b"")

    try:
        with open(train, "rb") as train_file, open(test, "rb") if test else contextlib.nullcontext() as test_file:
            report, _ = check_dataset(
                settings, (train.name, chunks(train_file)), (test.name, chunks(test_file)) if test else None,
                metadata=metadata, sidecar=(sidecar.name, sidecar.read_bytes() if sidecar.is_file() else None),
                min_examples=min_examples)
    except OSError as exc:
        if as_json:
            click.echo(json.dumps({"accepted": False, "errors": [{"line": None, "code": "unreadable",
                                                                 "message": f"{exc.filename or file}: {exc.strerror}"}],
                                   "warnings": [], "stats": {}}))
        else:
            click.echo(f"Error: cannot read {exc.filename or file}: {exc.strerror}", err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        click.echo(report.summary())
    sys.exit(0 if report.accepted else 1)


@cli.command()
def sweep():
    """Run the sweeper now instead of waiting for its timer."""
    client = _client()
    _api(lambda: client.run_function("sweeper"))
    click.echo("Sweeper started.")


@cli.command()
@click.option("--prompt", default="What is the capital of Italy?", show_default=True,
              help="What to ask the fine-tuned model.")
@click.option("--dataset", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=PROJECT_ROOT / "samples" / "chat-sample.jsonl", show_default="samples/chat-sample.jsonl")
@click.option("--base-model", default="smollm2-135m-instruct", show_default=True,
              help="smollm2-135m-instruct, or tiny-random for a quick smoke run.")
@click.option("--timeout", "timeout_s", default=900, show_default=True, help="Give up after this many seconds.")
@click.option("-v", "--verbose", is_flag=True, help="Also show the host's and handlers' logs.")
def demo(prompt: str, dataset: Path, base_model: str, timeout_s: int, verbose: bool):
    """The whole loop on this machine: drop, validate, fine-tune, register, deploy, score, tear down."""
    from tunedrop.demo import run_demo

    state_dir = Path(os.environ.get("TUNEDROP_STATE_DIR") or PROJECT_ROOT / ".tunedrop") / "demo"
    sys.exit(run_demo(dataset=dataset, prompt=prompt, base_model=base_model, timeout_s=timeout_s, verbose=verbose,
                      state_dir=state_dir))


def _table(title: str, rows: list[tuple[str, str, str]], markdown: bool) -> None:
    if markdown:
        click.echo(f"| {title} | Default | What it does |\n|---|---|---|")
        for name, default, help_text in rows:
            click.echo(f"| `{name}` | " + (f"`{default}`" if default else "") + f" | {help_text} |")
        return
    for name, default, help_text in rows:
        click.echo(f"{name} (default: {default or '-'})\n    {help_text}")


@cli.command()
@click.option("--markdown", is_flag=True, help="As the README's tables.")
@click.option("--training", is_flag=True, help="The training parameters (overridable per dataset) instead.")
def settings(markdown: bool, training: bool):
    """Every app setting (or training parameter), its default and what it does."""
    if training:
        from shared.training import describe

        _table("Parameter", describe(), markdown)
    else:
        from shared.settings import describe

        _table("Setting", describe(), markdown)


@cli.group()
def keys():
    """API keys of the OpenAI-compatible routes (/api/v1): TUNEDROP_API_KEYS holds their SHA-256, never a key."""


@keys.command("new")
@click.argument("name")
def keys_new(name: str):
    """Make a key named NAME: prints the key (give it to the client, once) and its TUNEDROP_API_KEYS entry.

    Rotate by adding the new entry to TUNEDROP_API_KEYS (comma-separated), moving clients over, then
    removing the old entry."""
    from shared.api_keys import ApiKeysError, entry, new_key

    key = new_key()
    try:
        line = entry(name, key)
    except ApiKeysError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    click.echo(f"key:   {key}")
    click.echo(f"entry: {line}")
    click.echo("Add the entry to TUNEDROP_API_KEYS (azd env set TUNEDROP_API_KEYS ...; azd provision). The key is "
               "shown only now.", err=True)


@keys.command("local")
def keys_local():
    """Print the local host's key: `api_key` of an OpenAI client against `tunedrop up` (and its function key)."""
    from tunedrop.client import host_keys

    key = host_keys(_settings().state_dir).get("functionKey")
    if not key:
        raise click.ClickException("No local key yet: `tunedrop up` makes one on its first start.")
    click.echo(key)


@cli.command()
def secret():
    """Print a new webhook signing secret (for TUNEDROP_WEBHOOK_SECRET)."""
    from shared.webhooks import new_secret

    click.echo(new_secret())


def main():
    cli()


if __name__ == "__main__":
    main()
