"""`hmkd` commands of the job service: submit and follow jobs, and run the service.

Client commands (`submit`, `jobs`, `status`, `logs`, `cancel`, `retry`, `download`, `queue`)
talk HTTP through `client.sdk`, finding the API and token by themselves (`HMKD_API_URL`,
`HMKD_TOKEN`, else the embedded default's). Server commands (`serve`, `worker`, `db upgrade`,
`users create`, `tokens create`) act on the configured database directly and import the server
packages lazily, so `hmkd --help` stays fast.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from client.follow import eval_line, follow, jobs_table, queue_tables, status_table
from client.sdk import TERMINAL_STATES, ApiError, Client
from hmkd_core.spec import NAMED_WEIGHTS

app = typer.Typer(no_args_is_help=True, add_completion=False)
users_app = typer.Typer(no_args_is_help=True, help="Users of the service (server side).")
tokens_app = typer.Typer(no_args_is_help=True, help="API tokens (server side).")
db_app = typer.Typer(no_args_is_help=True, help="The service's database (server side).")
app.add_typer(users_app, name="users")
app.add_typer(tokens_app, name="tokens")
teams_app = typer.Typer(no_args_is_help=True, help="Teams (server side).")
app.add_typer(teams_app, name="teams")
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)
JobArg = Annotated[str, typer.Argument(metavar="JOB", help="The job's id.")]


def _fail(message: str, code: int = 2) -> None:
    err_console.print(f"[red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _client() -> Client:
    return Client()


def _api(call: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an SDK call; an API error prints the server's message and exits."""
    try:
        return call(*args, **kwargs)
    except ApiError as err:
        _fail(str(err), code=1 if err.status in (0, 409) or err.status >= 500 else 2)


def read_spec(path: Path, overrides: list[str]) -> dict[str, Any]:
    """A job spec from YAML/JSON, `--set a.b=value` applied, relative paths made absolute
    against the spec's folder (the server resolves nothing relative)."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except OSError as err:
        _fail(f"{path}: cannot read the spec: {err.strerror}")
    except (ValueError, yaml.YAMLError) as err:
        _fail(f"{path}: not valid YAML/JSON: {err}")
    if not isinstance(data, dict):
        _fail(f"{path}: a spec is a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            _fail(f"--set {item!r}: write KEY=VALUE, e.g. --set teacher.weights=job:<id>")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    base = path.parent.resolve()

    def absolute(value: Any) -> Any:
        if not isinstance(value, str) or Path(value).is_absolute():
            return value
        return str((base / value).resolve())

    for split in (data.get("data") or {}).values():
        if isinstance(split, dict):
            for key in ("images", "annotations"):
                if key in split:
                    split[key] = absolute(split[key])
    for model in (data.get("student"), data.get("teacher")):
        if isinstance(model, dict) and "weights" in model:
            weights = model["weights"]
            if weights not in NAMED_WEIGHTS and not str(weights).startswith("job:"):
                model["weights"] = absolute(weights)
    return data


def _final(job: dict[str, Any], quiet: bool) -> None:
    if quiet:
        typer.echo(job["id"])
    else:
        console.print(f"job {job['id']} {job['state']} at iteration {job['iteration']}")
        if job.get("latest_eval"):
            console.print(f"final: {eval_line(job['latest_eval'])}")
        if job.get("best_eval") and job["best_eval"] != job.get("latest_eval"):
            console.print(f"best:  {eval_line(job['best_eval'])}")
    if job["state"] != "succeeded":
        err_console.print(f"[red]{job['state']}[/]: {escape(job.get('error') or '')}")
        raise typer.Exit(1)


def chain_specs(specs: list[dict[str, Any]], paths: list[Path]) -> None:
    """Check that each spec after the first can take the job before it as its teacher: a
    distill spec whose `teacher.weights` is left out (or is that job). Refused before anything
    is submitted, so a bad chain leaves no half of itself queued."""
    for spec, path in zip(specs[1:], paths[1:], strict=True):
        if spec.get("kind") != "distill":
            _fail(f"{path}: a spec after the first distils from the job before it: kind distill")
        teacher = spec.get("teacher")
        if teacher is not None and not isinstance(teacher, dict):
            _fail(f"{path}: teacher must be a mapping")
        weights = (teacher or {}).get("weights")
        if weights not in (None, "none"):
            _fail(
                f"{path}: teacher.weights is {weights!r}, but in a chain the job before it is "
                "its teacher: leave teacher.weights out"
            )


@app.command()
def submit(
    spec_paths: Annotated[
        list[Path],
        typer.Argument(
            metavar="SPEC...",
            help="YAML or JSON job spec. Several: a chain, each distilled from the job before "
            "it (teacher.yaml student.yaml); the later ones wait for their teacher.",
        ),
    ],
    follow_: Annotated[
        bool, typer.Option("--follow", "-f", help="Show progress until the job(s) end.")
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field (of every spec): --set schedule.lr=1e-4."),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            help="Retry-safe: the same key never makes a second job (per spec: KEY-1...)."
        ),
    ] = None,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Print only the job ids on stdout.")
    ] = False,
) -> None:
    """Submit a job, or a teacher and its students; --follow draws their progress and prints
    AP and AP_S."""
    specs = [read_spec(path, overrides or []) for path in spec_paths]
    chain_specs(specs, spec_paths)
    jobs: list[dict[str, Any]] = []
    with _client() as client:
        for i, spec in enumerate(specs):
            if jobs:
                spec["teacher"] = {
                    **(spec.get("teacher") or {}),
                    "weights": f"job:{jobs[-1]['id']}",
                }
            key = idempotency_key
            if key is not None and len(specs) > 1:
                key = f"{key}-{i + 1}"
            job = _api(client.submit, spec, idempotency_key=key)
            jobs.append(job)
            if not quiet:
                place = (
                    f", #{job['queue_position']} in {job['queue']}" if job["queue_position"] else ""
                )
                err_console.print(f"submitted job {job['id']} ({job['state']}{place})")
            for warning in job.get("warnings") or []:
                err_console.print(f"[yellow]warning:[/] {escape(warning)}")
        if not follow_:
            if quiet:
                for job in jobs:
                    typer.echo(job["id"])
            return
        for job in jobs:
            _final(_api(follow, client, job["id"], err_console), quiet)


@app.command("jobs")
def list_jobs(
    state: Annotated[list[str] | None, typer.Option(help="queued, running, ...")] = None,
    kind: Annotated[str | None, typer.Option(help="train, distill or evaluate.")] = None,
    queue: Annotated[str | None, typer.Option()] = None,
    name: Annotated[str | None, typer.Option(help="Name contains.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=200)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Your team's jobs, newest first."""
    with _client() as client:
        page = _api(client.jobs, state=state, kind=kind, queue=queue, name=name, limit=limit)
    if as_json:
        console.print_json(data=page)
    else:
        console.print(jobs_table(page["items"]))


@app.command()
def status(job_id: JobArg, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Where a job stands: state, progress, ETA, losses, evaluations, error."""
    with _client() as client:
        job = _api(client.job, job_id)
    if as_json:
        console.print_json(data=job)
    else:
        console.print(status_table(job))


@app.command()
def logs(
    job_id: JobArg,
    follow_: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing.")] = False,
    tail: Annotated[int | None, typer.Option(min=1, help="Only the last N lines.")] = None,
) -> None:
    """A job's log; -f follows it until the job ends."""
    with _client() as client:
        if not follow_:
            console.out(_api(client.logs, job_id, tail=tail), end="")
            return
        text, offset = _api(client.logs_tail, job_id, tail or 20)
        console.out(text, end="")
        while True:
            text, offset = _api(client.logs_from, job_id, offset)
            if text:
                console.out(text, end="")
                continue
            if _api(client.job, job_id)["state"] in TERMINAL_STATES:
                text, offset = _api(client.logs_from, job_id, offset)
                console.out(text, end="")
                return
            time.sleep(1.0)


@app.command()
def cancel(job_id: JobArg) -> None:
    """Cancel a job: a queued one at once, a running one within seconds."""
    with _client() as client:
        job = _api(client.cancel, job_id)
    note = " (stopping)" if job["cancel_requested"] and job["state"] == "running" else ""
    console.print(f"job {job['id']} {job['state']}{note}")


@app.command()
def preempt(job_id: JobArg) -> None:
    """Give a running job's worker back: it checkpoints, requeues and resumes later."""
    with _client() as client:
        job = _api(client.preempt, job_id)
    console.print(f"job {job['id']} checkpoints at its next iteration and goes back to the queue")


@app.command()
def retry(job_id: JobArg) -> None:
    """Queue a failed or cancelled job again; it resumes from its checkpoint."""
    with _client() as client:
        job = _api(client.retry, job_id)
    console.print(f"job {job['id']} {job['state']} (attempt {job['attempt']} done so far)")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


@app.command("rm")
def remove(
    job_ids: Annotated[list[str], typer.Argument(metavar="JOB...", help="The jobs' ids.")],
    artifact: Annotated[
        str | None,
        typer.Option("--artifact", help="Delete only this file, e.g. run/checkpoints/best.pt."),
    ] = None,
) -> None:
    """Delete ended jobs with their files, or one file of each (--artifact)."""
    freed, failed = 0, False
    with _client() as client:
        for job_id in job_ids:
            try:
                if artifact is None:
                    done = client.delete(job_id)
                else:
                    done = client.delete_artifact(job_id, artifact)
            except ApiError as err:  # the others are still deleted; the exit code says so
                err_console.print(f"[red]error:[/] {escape(str(err))}")
                failed = True
                continue
            freed += done["freed_bytes"]
            what = f"{artifact} of job" if artifact else "job"
            console.print(f"deleted {what} {done['id']} ({_size(done['freed_bytes'])})")
    if len(job_ids) > 1:
        console.print(f"freed {_size(freed)}")
    if failed:
        raise typer.Exit(1)


@app.command()
def download(
    job_id: JobArg,
    artifact: Annotated[
        str, typer.Argument(help="Name inside the job, e.g. run/eval.json.")
    ] = "run/student.pt",
    out: Annotated[Path, typer.Option("--out", "-o", help="File or folder.")] = Path("."),
) -> None:
    """Download an artifact (default: the student), checked by sha256.

    An interrupted download resumes where it stopped.
    """
    bar = Progress(
        "[bold]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
        console=err_console,
    )  # fmt: skip
    with _client() as client, bar:
        task = bar.add_task(artifact, total=None)
        path = _api(
            client.download,
            job_id,
            artifact,
            out,
            progress=lambda done, total: bar.update(task, completed=done, total=total or None),
        )
    typer.echo(str(path))


@app.command("queue")
def show_queue() -> None:
    """Queued and running jobs per queue, your jobs' positions, workers and GPUs."""
    with _client() as client:
        overview = _api(client.queue)
    for table in queue_tables(overview):
        console.print(table)


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="User name.")],
    team: Annotated[str, typer.Option("--team", help="Team (created if missing).")],
    admin: Annotated[bool, typer.Option("--admin", help="Make an administrator.")] = False,
) -> None:
    """Create a user and print their first token (shown once)."""
    from jobs.admin import create_user
    from jobs.auth import AlreadyExists
    from jobs.migrate import DatabaseNotMigrated
    from jobs.settings import Settings

    try:
        issued = create_user(Settings(), name, team=team, is_admin=admin)
    except (AlreadyExists, DatabaseNotMigrated, ValueError) as err:
        _fail(str(err))
    err_console.print(
        escape(f"created user {issued.user} in team {issued.team}; their token (shown once):")
    )
    typer.echo(issued.token)


@tokens_app.command("create")
def tokens_create(
    user: Annotated[str, typer.Option("--user", help="An existing user.")],
    name: Annotated[str, typer.Option(help="A label for the token.")] = "",
) -> None:
    """Issue another token for a user and print it (shown once)."""
    from jobs.admin import create_token
    from jobs.auth import UnknownUser
    from jobs.migrate import DatabaseNotMigrated
    from jobs.settings import Settings

    try:
        issued = create_token(Settings(), user, name=name)
    except (UnknownUser, DatabaseNotMigrated) as err:
        _fail(str(err))
    err_console.print(escape(f"token for {issued.user} (team {issued.team}), shown once:"))
    typer.echo(issued.token)


@tokens_app.command("list")
def tokens_list(
    user: Annotated[str | None, typer.Option("--user", help="Only this user's.")] = None,
) -> None:
    """Tokens by prefix (never the token itself): user, label, created, last used, revoked."""
    from jobs.admin import list_tokens
    from jobs.auth import UnknownUser
    from jobs.migrate import DatabaseNotMigrated
    from jobs.settings import Settings

    try:
        tokens = list_tokens(Settings(), user)
    except (UnknownUser, DatabaseNotMigrated) as err:
        _fail(str(err))
    for t in tokens:
        state = "revoked" if t.revoked else "live"
        used = t.last_used_at or "never used"
        typer.echo(f"{t.prefix}  {t.user}  {t.name or '-'}  {t.created_at}  {used}  {state}")


@tokens_app.command("revoke")
def tokens_revoke(
    prefix: Annotated[
        str,
        typer.Argument(
            help="The token's prefix exactly as `tokens list` shows it, or the whole token "
            "(needed when two tokens show the same prefix)."
        ),
    ],
) -> None:
    """Revoke a token: its next request is refused (401)."""
    from jobs.admin import revoke_token
    from jobs.auth import UnknownToken
    from jobs.migrate import DatabaseNotMigrated
    from jobs.settings import Settings

    try:
        info = revoke_token(Settings(), prefix)
    except (UnknownToken, DatabaseNotMigrated) as err:
        _fail(str(err))
    err_console.print(escape(f"revoked token {info.prefix} of {info.user}"))


@users_app.command("disable")
def users_disable(name: Annotated[str, typer.Argument(help="User name.")]) -> None:
    """Revoke every token of a user; their jobs stay with the team."""
    from jobs.admin import disable_user
    from jobs.auth import UnknownUser
    from jobs.migrate import DatabaseNotMigrated
    from jobs.settings import Settings

    try:
        count = disable_user(Settings(), name)
    except (UnknownUser, DatabaseNotMigrated) as err:
        _fail(str(err))
    err_console.print(escape(f"disabled {name}: {count} live token(s) revoked"))


@teams_app.command("limit")
def teams_limit(
    name: Annotated[str, typer.Argument(help="Team name.")],
    max_running: Annotated[
        int | None,
        typer.Option("--max-running", min=1, help="Jobs of the team that may run at once."),
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="Use the deployment's default cap instead.")
    ] = False,
) -> None:
    """Cap how many of a team's jobs run at once; the others wait in the queue."""
    from jobs.admin import UnknownTeam, set_team_cap
    from jobs.migrate import DatabaseNotMigrated
    from jobs.settings import Settings

    if (max_running is None) == (not default):
        _fail("give either --max-running N or --default")
    try:
        cap = set_team_cap(Settings(), name, max_running)
    except (UnknownTeam, DatabaseNotMigrated) as err:
        _fail(str(err))
    err_console.print(escape(f"team {name}: at most {cap or 'unlimited'} running job(s)"))


@teams_app.command("retention")
def teams_retention(
    name: Annotated[str, typer.Argument(help="Team name.")],
    keep_latest: Annotated[
        int | None,
        typer.Option("--keep-latest", min=0, help="Newest checkpoints a succeeded job keeps."),
    ] = None,
    keep_best: Annotated[
        bool | None, typer.Option("--keep-best/--drop-best", help="Keep best.pt.")
    ] = None,
    default: Annotated[
        bool, typer.Option("--default", help="Back to the default: the latest and the best.")
    ] = False,
) -> None:
    """What the team's succeeded jobs keep of their checkpoints (a job's spec.retention wins)."""
    from jobs.admin import UnknownTeam, set_team_retention
    from jobs.migrate import DatabaseNotMigrated
    from jobs.settings import Settings

    given = keep_latest is not None or keep_best is not None
    if given == default:
        _fail("give --keep-latest N and/or --keep-best/--drop-best, or --default")
    try:
        changes = None if default else {"keep_latest": keep_latest, "keep_best": keep_best}
        policy = set_team_retention(Settings(), name, changes)
    except (UnknownTeam, DatabaseNotMigrated) as err:
        _fail(str(err))
    best = "and best.pt" if policy.keep_best else "without best.pt"
    kept = f"{policy.keep_latest} checkpoint(s) {best}"
    err_console.print(escape(f"team {name}: succeeded jobs keep {kept}"))


@teams_app.command("set")
def teams_set(
    name: Annotated[str, typer.Argument(help="Team name.")],
    share: Annotated[
        float | None, typer.Option("--share", min=0.001, help="Weight in fair share (default 1).")
    ] = None,
    gpu_quota: Annotated[
        int | None, typer.Option("--gpu-quota", min=0, help="Most GPUs its jobs hold at once.")
    ] = None,
    no_gpu_quota: Annotated[
        bool, typer.Option("--no-gpu-quota", help="Remove the team's GPU quota.")
    ] = False,
) -> None:
    """Set a team's fair share and GPU quota: queued jobs start by each team's GPU use over its
    share, then priority within the team."""
    from jobs.admin import UnknownTeam, set_team
    from jobs.migrate import DatabaseNotMigrated
    from jobs.settings import Settings

    changes: dict[str, Any] = {}
    if share is not None:
        changes["share"] = share
    if gpu_quota is not None and no_gpu_quota:
        _fail("give --gpu-quota N or --no-gpu-quota, not both")
    if gpu_quota is not None or no_gpu_quota:
        changes["gpu_quota"] = None if no_gpu_quota else gpu_quota
    if not changes:
        _fail("give --share, --gpu-quota N or --no-gpu-quota")
    try:
        info = set_team(Settings(), name, **changes)
    except (UnknownTeam, DatabaseNotMigrated, ValueError) as err:
        _fail(str(err))
    quota = "no GPU quota" if info.gpu_quota is None else f"GPU quota {info.gpu_quota}"
    err_console.print(escape(f"team {name}: share {info.share:g}, {quota}"))


@teams_app.command("list")
def teams_list() -> None:
    """Every team with its share, quotas and the GPUs it holds now."""
    from rich.table import Table

    from jobs.admin import list_teams
    from jobs.db import session_scope
    from jobs.migrate import DatabaseNotMigrated, check_current
    from jobs.settings import Settings

    settings = Settings()
    try:
        check_current(settings.database_url)
    except DatabaseNotMigrated as err:
        _fail(str(err))
    with session_scope(settings.database_url) as session:
        teams = list_teams(session)
    table = Table()
    for column in ("team", "share", "GPU quota", "job cap", "GPUs held"):
        table.add_column(column)
    for t in teams:
        table.add_row(
            escape(t.name), f"{t.share:g}", "–" if t.gpu_quota is None else str(t.gpu_quota),
            "default" if t.max_running is None else str(t.max_running), str(t.gpus_running),
        )  # fmt: skip
    console.print(table)


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Migrate the configured database (HMKD_DATABASE_URL) to this code's schema."""
    from jobs.admin import db_upgrade as upgrade
    from jobs.settings import Settings

    typer.echo(str(upgrade(Settings(), revision)))


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data folder (default HMKD_DATA_DIR or ~/.hmkd).")
    ] = None,
    worker: Annotated[bool, typer.Option(help="Start one worker on the default queue.")] = True,
) -> None:
    """Run the service: the API and, by default, one worker.

    On the embedded default the database is migrated and a local admin token written where
    the CLI finds it.
    """
    from client.serve import run_service

    try:
        run_service(host=host, port=port, data_dir=data_dir, with_worker=worker, console=console)
    except RuntimeError as err:  # DatabaseNotMigrated and a worker that cannot start
        _fail(str(err))


@app.command("worker")
def run_worker_command(
    queue: Annotated[
        list[str], typer.Option("--queue", "-Q", help="Queue to serve; repeat for several.")
    ],
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs at once (CPU only).")] = 1,
    loglevel: Annotated[str, typer.Option()] = "info",
    name: Annotated[
        str | None,
        typer.Option(
            "--name",
            help="This worker's name in /v1/queue and /metrics (default: "
            "$HMKD_WORKER_NAME, else hmkd-<pid>@<host>, unique per process).",
        ),
    ] = None,
) -> None:
    """Run a worker serving QUEUEs, one job at a time on this machine's GPUs."""
    from jobs.migrate import DatabaseNotMigrated, check_current
    from jobs.settings import Settings
    from worker.cli import run_worker, worker_name

    try:
        check_current(Settings().database_url)
    except DatabaseNotMigrated as err:
        _fail(str(err))
    try:
        hostname = worker_name(name)
    except ValueError as err:
        _fail(str(err))
    run_worker(queue, concurrency=concurrency, loglevel=loglevel, hostname=hostname)
