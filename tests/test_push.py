"""`reavl push` without the Hub: the plan, the exact commit operations, the pinned knowledge revision, and the
failures that must stop a push before anything is written (no token, unreachable endpoint).

The machine running the tests cannot reach the Hub, so the remote service is replaced by `RecordingHubApi`, a test
double that records every call `push_to_hub` makes on an `HfApi`. The token and endpoint failures use the real
`HfApi` against a closed local port. The export folders here are written by hand with just the files `push` reads
and uploads (test_export.py pushes a real export through the same double).
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.export import KNOWLEDGE_REVISION_PLACEHOLDER, REPO_ID_PLACEHOLDER, knowledge_folder_for
from training.push import PushError, PushPlan, fill_model_card, pin_knowledge_revision, plan_push, push_to_hub


PROJECT_ROOT = Path(__file__).resolve().parents[1]

README = f"""---
library_name: transformers
tags:
- reavl
- custom_code
widget:
- src: examples/widget-0.png
  text: Which river crosses it?
  output:
  - label: Oda
    score: 0.61
---

# REAVL

```python
pipe = pipeline(model="{REPO_ID_PLACEHOLDER}", trust_remote_code=True)
```
"""


def _write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _export_folder(root: Path, knowledge_repo_id: str | None) -> Path:
    """An export-shaped folder (and, with a knowledge repo, its `-knowledge` dataset folder)."""
    export = root / "reavl-vqa"
    _write(export / "config.json", json.dumps({"architectures": ["ReavlForQuestionAnswering"], "num_knowledge": 2}))
    _write(export / "model.safetensors", b"\0" * 64)
    _write(export / "modeling_reavl.py", "# model code\n")
    _write(export / "examples/widget-0.png", b"\x89PNG fake")
    _write(export / "README.md", README)
    settings = {"num_knowledge": 2, "processor_class": "ReavlProcessor"}
    if knowledge_repo_id:
        settings.update(knowledge_repo_id=knowledge_repo_id, knowledge_revision=KNOWLEDGE_REVISION_PLACEHOLDER)
        knowledge = knowledge_folder_for(export)
        _write(knowledge / "data/train-00000-of-00001.parquet", b"PAR1")
        _write(knowledge / "index.faiss", b"IxF")
        _write(knowledge / "knowledge_config.json", "{}")
        _write(knowledge / "README.md", "---\nconfigs: []\n---\n")
    else:
        settings["knowledge_path"] = "knowledge"
        _write(export / "knowledge/index.faiss", b"IxF")
        _write(export / "knowledge/knowledge_config.json", "{}")
        _write(export / "knowledge/data/train-00000-of-00001.parquet", b"PAR1")
    _write(export / "processor_config.json", json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return export


def _tree_digest(*folders: Path) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


class _CommitInfo:
    def __init__(self, oid: str):
        self.oid = oid


class RecordingHubApi:
    """Test double of `huggingface_hub.HfApi` (the real Hub is unreachable from the test machine): records each
    call, keeps the uploaded bytes, and answers like the Hub would for empty or existing repos."""

    endpoint = "https://hub.example"

    def __init__(self, remote_files: dict[str, list[str]] | None = None, fail_on_commit_to: str | None = None):
        self.calls: list[tuple] = []
        self.remote_files = remote_files or {}
        self.fail_on_commit_to = fail_on_commit_to
        self.uploads: dict[str, dict[str, bytes]] = {}

    def whoami(self, token=None):
        self.calls.append(("whoami",))
        return {"name": "tester"}

    def create_repo(self, repo_id, repo_type=None, private=None, exist_ok=False, token=None):
        self.calls.append(("create_repo", repo_id, repo_type, private, exist_ok))

    def create_branch(self, repo_id, branch, repo_type=None, exist_ok=False, token=None):
        self.calls.append(("create_branch", repo_id, branch, repo_type))

    def list_repo_files(self, repo_id, repo_type=None, revision=None, token=None):
        self.calls.append(("list_repo_files", repo_id, repo_type, revision))
        return list(self.remote_files.get(repo_id, []))

    def create_commit(self, repo_id, operations, commit_message, repo_type=None, revision=None, token=None):
        operations = list(operations)
        adds = sorted(op.path_in_repo for op in operations if type(op).__name__ == "CommitOperationAdd")
        deletes = sorted(op.path_in_repo for op in operations if type(op).__name__ == "CommitOperationDelete")
        self.calls.append(("create_commit", repo_id, repo_type, revision, commit_message, tuple(adds), tuple(deletes)))
        if repo_id == self.fail_on_commit_to:
            raise ConnectionError("connection reset by peer")
        contents = {}
        for op in operations:
            if type(op).__name__ == "CommitOperationAdd":
                source = op.path_or_fileobj
                contents[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
        self.uploads[repo_id] = contents
        return _CommitInfo(hashlib.sha1(repo_id.encode()).hexdigest())


MODEL_FILES = (
    "README.md", "config.json", "examples/widget-0.png", "model.safetensors", "modeling_reavl.py",
    "processor_config.json",
)
KNOWLEDGE_FILES = ("README.md", "data/train-00000-of-00001.parquet", "index.faiss", "knowledge_config.json")


def test_knowledge_repo_pushed_first_and_model_pinned_to_its_commit(tmp_path):
    export = _export_folder(tmp_path, knowledge_repo_id="org/reavl-kb")
    before = _tree_digest(export, knowledge_folder_for(export))
    api = RecordingHubApi(remote_files={"org/reavl-vqa": [".gitattributes", "old_weights.bin", "README.md"]})

    result = push_to_hub(export, "org/reavl-vqa", private=True, revision="dev", commit_message="v1", api=api)

    knowledge_sha = hashlib.sha1(b"org/reavl-kb").hexdigest()
    assert api.calls == [
        ("whoami",),
        ("create_repo", "org/reavl-kb", "dataset", True, True),
        ("create_branch", "org/reavl-kb", "dev", "dataset"),
        ("list_repo_files", "org/reavl-kb", "dataset", "dev"),
        ("create_commit", "org/reavl-kb", "dataset", "dev", "v1", KNOWLEDGE_FILES, ()),
        ("create_repo", "org/reavl-vqa", "model", True, True),
        ("create_branch", "org/reavl-vqa", "dev", "model"),
        ("list_repo_files", "org/reavl-vqa", "model", "dev"),
        ("create_commit", "org/reavl-vqa", "model", "dev", "v1", MODEL_FILES, ("old_weights.bin",)),
    ]
    model_sha = hashlib.sha1(b"org/reavl-vqa").hexdigest()
    assert result.commits == {"org/reavl-kb": knowledge_sha, "org/reavl-vqa": model_sha}

    uploaded = api.uploads["org/reavl-vqa"]
    settings = json.loads(uploaded["processor_config.json"])
    assert settings["knowledge_repo_id"] == "org/reavl-kb"
    assert settings["knowledge_revision"] == knowledge_sha
    readme = uploaded["README.md"].decode()
    assert REPO_ID_PLACEHOLDER not in readme and 'pipeline(model="org/reavl-vqa"' in readme
    metadata = yaml.safe_load(readme.split("---\n")[1])
    assert metadata["widget"][0]["src"] == "https://hub.example/org/reavl-vqa/resolve/dev/examples/widget-0.png"
    assert metadata["widget"][0]["output"] == [{"label": "Oda", "score": 0.61}]
    # Unchanged files go up byte for byte, and the local folders are never modified.
    assert uploaded["model.safetensors"] == (export / "model.safetensors").read_bytes()
    assert api.uploads["org/reavl-kb"]["index.faiss"] == b"IxF"
    assert _tree_digest(export, knowledge_folder_for(export)) == before


def test_inline_knowledge_is_one_commit_on_main(tmp_path):
    export = _export_folder(tmp_path, knowledge_repo_id=None)
    api = RecordingHubApi()
    push_to_hub(export, "org/reavl-vqa", api=api)
    commits = [call for call in api.calls if call[0] == "create_commit"]
    assert len(commits) == 1
    _, repo_id, repo_type, revision, message, adds, deletes = commits[0]
    assert (repo_id, repo_type, revision, deletes) == ("org/reavl-vqa", "model", None, ())
    assert set(adds) == set(MODEL_FILES) | {
        "knowledge/index.faiss", "knowledge/knowledge_config.json", "knowledge/data/train-00000-of-00001.parquet"
    }
    assert "create_branch" not in [call[0] for call in api.calls]
    assert api.uploads["org/reavl-vqa"]["processor_config.json"] == (export / "processor_config.json").read_bytes()


def test_dry_run_prints_plan_without_network(tmp_path, capsys):
    export = _export_folder(tmp_path, knowledge_repo_id="org/reavl-kb")
    plan = push_to_hub(export, "org/reavl-vqa", dry_run=True, api=object())  # any call on the api would fail
    assert isinstance(plan, PushPlan)
    assert [(u.repo_id, u.repo_type) for u in plan.uploads] == [("org/reavl-kb", "dataset"), ("org/reavl-vqa", "model")]
    assert plan.uploads[0].files == list(KNOWLEDGE_FILES)
    assert plan.uploads[1].files == list(MODEL_FILES)

    from training.push import main

    assert main([str(export), "--repo-id", "org/reavl-vqa", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "1. dataset repo org/reavl-kb" in printed and "2. model repo org/reavl-vqa" in printed
    assert "+ processor_config.json  [knowledge_revision pinned to the commit of step 1]" in printed
    assert "nothing was created or uploaded" in printed


def test_failed_model_commit_reports_what_was_committed_and_keeps_export(tmp_path):
    export = _export_folder(tmp_path, knowledge_repo_id="org/reavl-kb")
    before = _tree_digest(export, knowledge_folder_for(export))
    api = RecordingHubApi(fail_on_commit_to="org/reavl-vqa")
    with pytest.raises(PushError, match=r"Already committed: org/reavl-kb at [0-9a-f]{40}.*local export is unchanged"):
        push_to_hub(export, "org/reavl-vqa", api=api)
    assert _tree_digest(export, knowledge_folder_for(export)) == before


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda export: (export / "model.safetensors").unlink(), "missing model.safetensors"),
        (lambda export: __import__("shutil").rmtree(knowledge_folder_for(export)), "knowledge dataset folder"),
    ],
)
def test_incomplete_export_is_refused_before_any_call(tmp_path, change, message):
    export = _export_folder(tmp_path, knowledge_repo_id="org/reavl-kb")
    change(export)
    api = RecordingHubApi()
    with pytest.raises(PushError, match=message):
        push_to_hub(export, "org/reavl-vqa", api=api)
    assert api.calls == []


def test_bad_arguments(tmp_path):
    export = _export_folder(tmp_path, knowledge_repo_id="org/reavl-kb")
    with pytest.raises(PushError, match="ORG/NAME"):
        plan_push(export, "not-a-repo-id")
    with pytest.raises(PushError, match="exported for the knowledge repo org/reavl-kb, not org/other"):
        plan_push(export, "org/reavl-vqa", knowledge_repo_id="org/other")
    inline = _export_folder(tmp_path / "inline", knowledge_repo_id=None)
    with pytest.raises(PushError, match="carries its knowledge inline"):
        plan_push(inline, "org/reavl-vqa", knowledge_repo_id="org/reavl-kb")


def test_pin_and_fill_helpers():
    settings = b'{"knowledge_repo_id": "a/b", "knowledge_revision": "x"}'
    pinned = json.loads(pin_knowledge_revision(settings, "a/b", "f" * 40))
    assert pinned == {"knowledge_repo_id": "a/b", "knowledge_revision": "f" * 40}
    with pytest.raises(PushError, match="names the knowledge repo 'a/b', expected 'c/d'"):
        pin_knowledge_revision(b'{"knowledge_repo_id": "a/b"}', "c/d", "f" * 40)
    filled = fill_model_card(README.encode(), "me/model", "https://hf.co/me/model/resolve/main").decode()
    assert "https://hf.co/me/model/resolve/main/examples/widget-0.png" in filled
    assert 'pipeline(model="me/model"' in filled


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _push_cli(export: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    child_env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING"))}
    child_env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}", **env)
    return subprocess.run(
        [sys.executable, "-m", "training.cli", "push", str(export), "--repo-id", "org/reavl-vqa"],
        cwd=PROJECT_ROOT, env=child_env, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "no Hugging Face token found"),
        ({"HF_TOKEN": "hf_not_a_real_token"}, "cannot reach the Hub endpoint http://127.0.0.1:"),
    ],
)
def test_no_token_or_unreachable_endpoint_fails_before_writing(tmp_path, env, message):
    export = _export_folder(tmp_path, knowledge_repo_id="org/reavl-kb")
    before = _tree_digest(export, knowledge_folder_for(export))
    completed = _push_cli(export, tmp_path, **env)
    assert completed.returncode == 1, completed.stderr
    assert message in completed.stderr and "nothing was uploaded" in completed.stderr
    assert _tree_digest(export, knowledge_folder_for(export)) == before
