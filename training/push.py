"""`reavl push`: upload a folder written by `reavl export` to the Hugging Face Hub.

```
reavl push out/reavl-vqa --repo-id my-org/reavl-vqa --dry-run          # print the plan, touch nothing
reavl push out/reavl-vqa --repo-id my-org/reavl-vqa                      # knowledge inline (knowledge/)
reavl push out/reavl-vqa --repo-id my-org/reavl-vqa --private --revision dev --commit-message "v0.2"
```

With an export made with `--knowledge-repo-id ORG/KB` (model folder + `<folder>-knowledge/` dataset folder), the
push makes two commits, in this order:

1. the knowledge **dataset** repo `ORG/KB` (Parquet data, `index.faiss`, `knowledge_config.json`, dataset card);
2. the **model** repo, whose `processor_config.json` is uploaded with `knowledge_revision` set to the commit sha of
   step 1, so the model always loads the exact index it was exported with (the export holds a placeholder there).

The README's repo-id placeholder and relative widget image paths are filled in the same way. These rewrites happen
in the uploaded bytes only: the local export is never modified, so a failed push leaves it as it was and can be
re-run. Each repo is committed in one `create_commit` (files the repo holds but the export does not are deleted in
the same commit, so the repo mirrors the export exactly).

Before anything is created or uploaded the push checks the local folders (everything the plan needs is there) and
the token (`whoami`, which also proves the endpoint is reachable); a missing token or an unreachable endpoint stops
it there with a message saying which.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from training.export import REPO_ID_PLACEHOLDER, knowledge_folder_for, read_export_layout


REPO_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
KEPT_REMOTE_FILES = (".gitattributes",)


class PushError(RuntimeError):
    """The push could not start or could not finish; the message says what to do."""


@dataclass
class RepoUpload:
    """One commit of the plan: the files of one local folder going to one repo."""

    repo_id: str
    repo_type: str  # "model" or "dataset"
    folder: Path
    files: list[str]  # paths in the repo, sorted
    rewritten: dict[str, str] = field(default_factory=dict)  # path -> why its uploaded bytes differ from the file

    def total_bytes(self) -> int:
        return sum((self.folder / path).stat().st_size for path in self.files)


@dataclass
class PushPlan:
    uploads: list[RepoUpload]
    private: bool
    revision: str | None
    commit_message: str

    def describe(self) -> str:
        lines = [f"push plan: {len(self.uploads)} commit(s), revision {self.revision or 'main'}, "
                 f"{'private' if self.private else 'public'} repos created if missing"]
        for step, upload in enumerate(self.uploads, start=1):
            lines.append(
                f"{step}. {upload.repo_type} repo {upload.repo_id} <- {upload.folder.name}/ "
                f"({len(upload.files)} files, {upload.total_bytes():,} bytes), message {self.commit_message!r}"
            )
            for path in upload.files:
                note = f"  [{upload.rewritten[path]}]" if path in upload.rewritten else ""
                lines.append(f"     + {path}{note}")
            lines.append("     - files in the repo that the export does not have (listed at push time)")
        return "\n".join(lines)


@dataclass
class PushResult:
    plan: PushPlan
    commits: dict[str, str]  # repo id -> commit sha
    urls: dict[str, str]


def _listed_files(folder: Path) -> list[str]:
    files = []
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise PushError(f"{path} is a symbolic link; an export holds plain files only (re-run reavl export)")
        if path.is_file():
            files.append(path.relative_to(folder).as_posix())
    return files


def plan_push(
    export_dir: str | Path,
    repo_id: str,
    knowledge_repo_id: str | None = None,
    knowledge_dir: str | Path | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
) -> PushPlan:
    """Check the local export and list what will be uploaded where, without any network access.

    Raises:
        PushError: a repo id is malformed, or the export (or its knowledge folder) is incomplete.
    """
    export_dir = Path(export_dir)
    for name, value in (("repo id", repo_id), ("knowledge repo id", knowledge_repo_id)):
        if value is not None and not REPO_ID_PATTERN.match(value):
            raise PushError(f"{name} must look like ORG/NAME, got {value!r}")
    try:
        layout = read_export_layout(export_dir)
    except (FileNotFoundError, ValueError) as error:
        raise PushError(str(error)) from None
    commit_message = commit_message or "Upload REAVL model with reavl push"
    uploads = []
    if layout.knowledge_repo_id is not None:
        if knowledge_repo_id is not None and knowledge_repo_id != layout.knowledge_repo_id:
            raise PushError(
                f"{export_dir} was exported for the knowledge repo {layout.knowledge_repo_id}, not "
                f"{knowledge_repo_id}; "
                f"re-export with --knowledge-repo-id {knowledge_repo_id} or push without --knowledge-repo-id"
            )
        knowledge_dir = Path(knowledge_dir) if knowledge_dir is not None else knowledge_folder_for(export_dir)
        if not (knowledge_dir / "index.faiss").is_file() or not (knowledge_dir / "knowledge_config.json").is_file():
            raise PushError(
                f"the knowledge dataset folder {knowledge_dir} (index.faiss, knowledge_config.json, data/) is missing; "
                "it is written by `reavl export --knowledge-repo-id` next to the model folder"
            )
        uploads.append(RepoUpload(layout.knowledge_repo_id, "dataset", knowledge_dir, _listed_files(knowledge_dir)))
    elif knowledge_repo_id is not None:
        raise PushError(
            f"{export_dir} carries its knowledge inline (knowledge/); to publish it as a dataset repo, re-export with "
            f"`reavl export --knowledge-repo-id {knowledge_repo_id}`"
        )
    model_upload = RepoUpload(repo_id, "model", export_dir, _listed_files(export_dir))
    if layout.knowledge_repo_id is not None:
        model_upload.rewritten["processor_config.json"] = "knowledge_revision pinned to the commit of step 1"
    model_upload.rewritten["README.md"] = "repo id and widget image URLs filled in"
    uploads.append(model_upload)
    return PushPlan(uploads=uploads, private=private, revision=revision, commit_message=commit_message)


def pin_knowledge_revision(processor_config: bytes, knowledge_repo_id: str, revision: str) -> bytes:
    """`processor_config.json` with `knowledge_revision` (the export's placeholder) set to `revision`."""
    settings = json.loads(processor_config)
    if settings.get("knowledge_repo_id") != knowledge_repo_id:
        raise PushError(
            f"processor_config.json names the knowledge repo {settings.get('knowledge_repo_id')!r}, "
            f"expected {knowledge_repo_id!r}"
        )
    settings["knowledge_revision"] = revision
    return (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode("utf-8")


def fill_model_card(readme: bytes, repo_id: str, resolve_base: str) -> bytes:
    """README.md with the repo-id placeholder replaced and relative widget `src` paths made absolute URLs
    (`resolve_base`, e.g. `https://huggingface.co/ORG/NAME/resolve/main`): the Hub's widget fetches images by URL."""
    text = readme.decode("utf-8").replace(REPO_ID_PLACEHOLDER, repo_id)
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.DOTALL)
    if match is None:
        raise PushError("README.md has no YAML metadata block; re-run reavl export")
    metadata = yaml.safe_load(match.group(1)) or {}
    relative = [
        example for example in metadata.get("widget") or []
        if isinstance(example.get("src"), str) and not example["src"].startswith(("http://", "https://"))
    ]
    if not relative:
        return text.encode("utf-8")
    for example in relative:
        example["src"] = f"{resolve_base}/{example['src'].removeprefix('./')}"
    front = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True).strip()
    return f"---\n{front}\n---\n{text[match.end():]}".encode("utf-8")


def _check_access(api, token: str | None) -> str:
    """Name of the account the token belongs to; raises PushError when there is no token or no endpoint."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    endpoint = getattr(api, "endpoint", "the Hub")
    try:
        identity = api.whoami(token=token)
    except LocalTokenNotFoundError:
        raise PushError(
            "no Hugging Face token found: run `hf auth login` or set HF_TOKEN; nothing was uploaded"
        ) from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status == 401:
            raise PushError(f"the Hugging Face token was refused by {endpoint} (401); nothing was uploaded") from None
        raise PushError(f"{endpoint} answered the token check with an error ({error}); nothing was uploaded") from None
    except Exception as error:  # connection refused, DNS, TLS, offline mode: the endpoint cannot be reached
        raise PushError(
            f"cannot reach the Hub endpoint {endpoint} ({type(error).__name__}: {error}); check HF_ENDPOINT and the "
            "network; nothing was uploaded"
        ) from None
    return identity.get("name", "?") if isinstance(identity, dict) else "?"


def _commit(api, upload: RepoUpload, plan: PushPlan, token, replacements: dict[str, bytes]) -> str:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    api.create_repo(upload.repo_id, repo_type=upload.repo_type, private=plan.private, exist_ok=True, token=token)
    if plan.revision:
        api.create_branch(upload.repo_id, branch=plan.revision, repo_type=upload.repo_type, exist_ok=True, token=token)
    remote = api.list_repo_files(upload.repo_id, repo_type=upload.repo_type, revision=plan.revision, token=token)
    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=path, path_or_fileobj=replacements.get(path, str(upload.folder / path)))
        for path in upload.files
    ]
    stale = sorted(set(remote) - set(upload.files) - set(KEPT_REMOTE_FILES))
    operations += [CommitOperationDelete(path_in_repo=path) for path in stale]
    info = api.create_commit(
        upload.repo_id,
        operations=operations,
        commit_message=plan.commit_message,
        repo_type=upload.repo_type,
        revision=plan.revision,
        token=token,
    )
    return info.oid


def push_to_hub(
    export_dir: str | Path,
    repo_id: str,
    knowledge_repo_id: str | None = None,
    knowledge_dir: str | Path | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    token: str | None = None,
    api=None,
) -> PushPlan | PushResult:
    """Upload an exported folder (and its knowledge dataset folder) to the Hub; see the module docstring.

    Args:
        export_dir: the folder `reavl export` wrote.
        repo_id: the model repo, `ORG/NAME`.
        knowledge_repo_id: must match the export's knowledge repo when given (it is read from the export).
        knowledge_dir: the dataset folder; defaults to `<export_dir>-knowledge`.
        private: create missing repos as private.
        revision: branch to commit to (created if missing); `None` is `main`.
        commit_message: message of both commits.
        dry_run: only plan (no network at all) and return the [`PushPlan`].
        token: a Hub token; `None` uses the logged-in one / `HF_TOKEN`.
        api: an `HfApi` (or an object with the same methods); `None` builds `HfApi()` (honours `HF_ENDPOINT`).

    Returns:
        The plan on a dry run, else a [`PushResult`] with each repo's commit sha.

    Raises:
        PushError: bad arguments or export, no token, unreachable endpoint (all before any upload), or a failed
            commit (the message says what was already uploaded).
    """
    plan = plan_push(export_dir, repo_id, knowledge_repo_id, knowledge_dir, private, revision, commit_message)
    if dry_run:
        return plan
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    user = _check_access(api, token)
    endpoint = str(getattr(api, "endpoint", "https://huggingface.co")).rstrip("/")
    commits: dict[str, str] = {}
    urls: dict[str, str] = {}
    model_upload = plan.uploads[-1]
    replacements: dict[str, bytes] = {}
    try:
        if len(plan.uploads) == 2:
            knowledge_upload = plan.uploads[0]
            sha = _commit(api, knowledge_upload, plan, token, {})
            commits[knowledge_upload.repo_id] = sha
            urls[knowledge_upload.repo_id] = f"{endpoint}/datasets/{knowledge_upload.repo_id}"
            replacements["processor_config.json"] = pin_knowledge_revision(
                (model_upload.folder / "processor_config.json").read_bytes(), knowledge_upload.repo_id, sha
            )
        resolve_base = f"{endpoint}/{model_upload.repo_id}/resolve/{plan.revision or 'main'}"
        replacements["README.md"] = fill_model_card(
            (model_upload.folder / "README.md").read_bytes(), model_upload.repo_id, resolve_base
        )
        commits[model_upload.repo_id] = _commit(api, model_upload, plan, token, replacements)
        urls[model_upload.repo_id] = f"{endpoint}/{model_upload.repo_id}"
    except PushError:
        raise
    except Exception as error:
        done = ", ".join(f"{repo} at {sha}" for repo, sha in commits.items()) or "nothing"
        raise PushError(
            f"push as {user} failed: {type(error).__name__}: {error}. Already committed: {done}. The local export is "
            "unchanged; re-run the same command to finish"
        ) from error
    return PushResult(plan=plan, commits=commits, urls=urls)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reavl push", description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="folder written by reavl export")
    parser.add_argument("--repo-id", required=True, help="model repo, ORG/NAME")
    parser.add_argument("--knowledge-repo-id", help="knowledge dataset repo (must match the export's)")
    parser.add_argument("--knowledge-dir", type=Path, help="knowledge dataset folder (default: <export_dir>-knowledge)")
    parser.add_argument("--private", action="store_true", help="create missing repos as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    parser.add_argument("--commit-message", help="commit message")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit without network access")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        outcome = push_to_hub(
            args.export_dir,
            args.repo_id,
            knowledge_repo_id=args.knowledge_repo_id,
            knowledge_dir=args.knowledge_dir,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
        )
    except PushError as error:
        print(f"reavl push: {error}", file=sys.stderr)
        return 1
    if isinstance(outcome, PushPlan):
        if args.json:
            uploads = [{"repo_id": u.repo_id, "repo_type": u.repo_type, "files": u.files} for u in outcome.uploads]
            print(json.dumps(uploads, indent=2))
        else:
            print(outcome.describe())
            print("dry run: nothing was created or uploaded")
        return 0
    if args.json:
        print(json.dumps({"commits": outcome.commits, "urls": outcome.urls}, indent=2))
    else:
        for repo, sha in outcome.commits.items():
            print(f"pushed {repo} at {sha}: {outcome.urls[repo]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
