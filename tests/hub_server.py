"""A small, in-memory, Hugging Face Hub compatible HTTP server for tests.

Stdlib only. It speaks enough of the Hub protocol for the real ``huggingface_hub``
client (create_repo, preupload, NDJSON commit, LFS batch + basic transfer, resolve,
repo/revision info, refs, tree, paths-info, commits, branches, tags) so that tests
can push and pull repositories without network access.

Storage model (git-like): each commit has a 40-hex id, a parent list and a full
file tree ``{path: Entry}``; branches and tags map names to commit ids.  Regular
file contents are stored by git blob sha1, LFS contents by sha256.

Xet is NOT implemented: the client decides to use Xet purely client-side
(``hf_xet`` importable and ``HF_HUB_DISABLE_XET`` unset), so the test fixture forces
``huggingface_hub.constants.HF_HUB_DISABLE_XET = True``.  The xet token endpoints
answer 501 with an explicit message so a misconfigured client fails fast.

Fault injection: see :class:`Faults` (``server.faults``).

Only binds 127.0.0.1.  Start with ``HubServer().start()`` and stop with ``.stop()``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_THRESHOLD = 1024 * 1024  # files >= 1 MiB go through LFS
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".h5", ".npz", ".parquet", ".arrow")
MAX_BODY = 512 * 1024 * 1024  # refuse absurd request bodies
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Entry:
    size: int
    blob_id: str  # git sha1 of the content (regular) or of the LFS pointer (lfs)
    lfs_sha256: str | None = None  # set for LFS files

    @property
    def is_lfs(self) -> bool:
        return self.lfs_sha256 is not None


@dataclass
class Commit:
    id: str
    parents: list[str]
    title: str
    message: str
    date: str
    author: str
    tree: dict[str, Entry]


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    gated: bool = False  # file downloads need an account the owner granted (see `granted`)
    granted: set[str] = field(default_factory=set)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]


class HubError(Exception):
    """Raised inside handlers to produce a Hub-style error response."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


# --------------------------------------------------------------------------- faults


@dataclass
class _Rule:
    kind: str  # "status" | "drop" | "truncate"
    method: str | None
    pattern: re.Pattern
    remaining: int
    status: int = 500
    keep_bytes: int | None = None
    hits: int = 0


class Faults:
    """Fault-injection controller. All rules are bounded by a ``times`` counter.

    Patterns are regexes searched in the *decoded* request path (no query string),
    e.g. ``r"/resolve/.*/model\\.safetensors$"`` or ``r"/preupload/"``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []

    def fail(self, pattern: str, *, times: int = 1, status: int = 500, method: str | None = None) -> _Rule:
        """Answer ``status`` (default 500) ``times`` times for matching requests."""
        return self._add(_Rule("status", method, re.compile(pattern), times, status=status))

    def drop_connection(
        self, pattern: str, *, times: int = 1, keep_bytes: int | None = None, method: str | None = "GET"
    ) -> _Rule:
        """Send full headers (honest Content-Length) then only ``keep_bytes`` of the body
        (default: half) and close the socket, ``times`` times."""
        return self._add(_Rule("drop", method, re.compile(pattern), times, keep_bytes=keep_bytes))

    def truncate(
        self, pattern: str, *, times: int = 1, keep_bytes: int | None = None, method: str | None = "GET"
    ) -> _Rule:
        """Serve a short body *with a matching (short) Content-Length*: the response looks
        complete at the HTTP level but is smaller than the advertised file size."""
        return self._add(_Rule("truncate", method, re.compile(pattern), times, keep_bytes=keep_bytes))

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()

    def _add(self, rule: _Rule) -> _Rule:
        if rule.remaining < 0:
            raise ValueError("times must be >= 0")
        with self._lock:
            self._rules.append(rule)
        return rule

    def take(self, method: str, path: str, kinds: tuple[str, ...]) -> _Rule | None:
        with self._lock:
            for rule in self._rules:
                if rule.kind not in kinds or rule.remaining <= 0:
                    continue
                if rule.method is not None and rule.method != method:
                    continue
                if rule.pattern.search(path):
                    rule.remaining -= 1
                    rule.hits += 1
                    return rule
        return None


# --------------------------------------------------------------------------- state


class HubState:
    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None):
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # git sha1 -> content (regular files)
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.tokens: dict[str, str] = dict(tokens or {})  # token -> username
        self.orgs: dict[str, list[str]] = dict(orgs or {})  # username -> orgs
        self.upload_tickets: dict[str, tuple[str, int]] = {}  # ticket -> (sha256, size)
        self._counter = 0

    # -- helpers
    def new_commit_id(self, seed: str) -> str:
        with self.lock:
            self._counter += 1
            return hashlib.sha1(f"{seed}\n{self._counter}\n{time.time_ns()}".encode()).hexdigest()

    def get_repo(self, repo_type: str, repo_id: str) -> Repo | None:
        with self.lock:
            return self.repos.get((repo_type, repo_id))

    def resolve(self, repo: Repo, revision: str) -> Commit:
        with self.lock:
            rev = unquote(revision)
            if rev in repo.branches:
                return repo.commits[repo.branches[rev]]
            if rev in repo.tags:
                return repo.commits[repo.tags[rev]]
            if rev.startswith("refs/heads/") and rev[11:] in repo.branches:
                return repo.commits[repo.branches[rev[11:]]]
            if rev.startswith("refs/tags/") and rev[10:] in repo.tags:
                return repo.commits[repo.tags[rev[10:]]]
            if COMMIT_RE.match(rev) and rev in repo.commits:
                return repo.commits[rev]
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def content_of(self, entry: Entry) -> bytes:
        with self.lock:
            if entry.is_lfs:
                return self.lfs[entry.lfs_sha256]
            return self.blobs[entry.blob_id]

    # -- repo management (usable directly from tests, too)
    def create_repo(self, repo_type: str, repo_id: str, *, private: bool = False, author: str = "system") -> Repo:
        with self.lock:
            if (repo_type, repo_id) in self.repos:
                raise HubError(409, "You already created this model repo", None)
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now_iso())
            # The Hub creates repos with an initial commit containing .gitattributes.
            gitattributes = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
            sha = git_blob_sha1(gitattributes)
            self.blobs[sha] = gitattributes
            cid = self.new_commit_id(repo_id)
            repo.commits[cid] = Commit(
                id=cid,
                parents=[],
                title="initial commit",
                message="",
                date=_now_iso(),
                author=author,
                tree={".gitattributes": Entry(size=len(gitattributes), blob_id=sha)},
            )
            repo.branches["main"] = cid
            self.repos[(repo_type, repo_id)] = repo
            return repo

    def tamper(self, repo_type: str, repo_id: str, path: str, data: bytes | None = None, revision: str = "main") -> None:
        """Replace the *stored bytes* of a file without touching its recorded sha/size.

        If ``data`` is None, the first byte is flipped (same size, different sha256).
        """
        with self.lock:
            repo = self.repos[(repo_type, repo_id)]
            entry = self.resolve(repo, revision).tree[path]
            old = self.content_of(entry)
            if data is None:
                data = bytes([old[0] ^ 0xFF]) + old[1:] if old else b"x"
            if entry.is_lfs:
                self.lfs[entry.lfs_sha256] = data
            else:
                self.blobs[entry.blob_id] = data


# --------------------------------------------------------------------------- handler


def _tree_folders(tree: dict[str, Entry]) -> set[str]:
    folders = set()
    for path in tree:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folders.add("/".join(parts[:i]))
    return folders


def _folder_oid(tree: dict[str, Entry], folder: str) -> str:
    h = hashlib.sha1()
    for path in sorted(tree):
        if path.startswith(folder + "/"):
            h.update(f"{path}\0{tree[path].blob_id}\n".encode())
    return h.hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "DeltahubTestHub/1.0"
    timeout = 15  # idle keep-alive connections end after this

    # silence default stderr logging
    def log_message(self, format, *args):  # noqa: A002
        pass

    @property
    def hub(self) -> "HubServer":
        return self.server.hub  # type: ignore[attr-defined]

    @property
    def state(self) -> HubState:
        return self.hub.state

    # ------------------------------------------------------------------ plumbing
    def setup(self):
        super().setup()
        self.server.track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.track(self.connection, False)  # type: ignore[attr-defined]

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if getattr(self, "_body", None) is not None:
            return self._body
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks, total = [], 0
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise HubError(400, "truncated chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line (bounded)
                    for _ in range(100):
                        trailer = self.rfile.readline(65537)
                        if trailer in (b"\r\n", b"\n", b""):
                            break
                    break
                total += size
                if total > MAX_BODY:
                    raise HubError(413, "body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline(3)  # CRLF after chunk
            body = b"".join(chunks)
        else:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                raise HubError(413, "body too large")
            body = self.rfile.read(length) if length else b""
        self._body = body
        return body

    def _json_body(self):
        try:
            return json.loads(self._read_body() or b"null")
        except ValueError:
            raise HubError(400, "Invalid JSON body")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json; charset=utf-8") -> None:
        self.send_response(status)
        hdrs = {"Content-Type": content_type, "Content-Length": str(len(body))}
        hdrs.update(headers or {})
        for k, v in hdrs.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, err: HubError, extra: dict[str, str] | None = None) -> None:
        headers = {"X-Error-Message": err.message}
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.update(extra or {})
        self._send_json({"error": err.message}, err.status, headers)

    def _dispatch(self, method: str) -> None:
        self._body = None
        split = urlsplit(self.path)
        self.query = {k: v for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        raw_path = split.path
        self.segments = [unquote(s) for s in raw_path.split("/")[1:]]
        decoded = "/" + "/".join(self.segments)
        self.hub.log_request(method, decoded)
        try:
            # Drain the request body early so keep-alive stays in sync even on errors.
            if method in ("POST", "PUT", "DELETE"):
                self._read_body()
            rule = self.hub.faults.take(method, decoded, ("status",))
            if rule is not None:
                raise HubError(rule.status, f"Injected fault ({rule.status})", None)
            self._route(method, raw_path)
        except HubError as err:
            extra = getattr(err, "extra_headers", None)
            self._send_error(err, extra)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # pragma: no cover - surfaced to the client as a 500
            self.hub.errors.append(repr(exc))
            try:
                self._send_error(HubError(500, f"Internal error: {exc!r}"))
            except OSError:
                self.close_connection = True

    # ------------------------------------------------------------------ auth
    def _user(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        if not auth:
            return None
        if not auth.lower().startswith("bearer "):
            raise HubError(401, "Invalid credentials in Authorization header")
        token = auth[7:].strip()
        with self.state.lock:
            user = self.state.tokens.get(token)
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.state.orgs.get(user, []))

    def _repo_for_read(self, repo_type: str, repo_id: str) -> Repo:
        user = self._user()
        repo = self.state.get_repo(repo_type, repo_id)
        if repo is None or (repo.private and not self._can_write(user, repo.namespace)):
            # The Hub answers 401 for anonymous callers and 404 for authenticated ones;
            # both carry X-Error-Code: RepoNotFound (=> RepositoryNotFoundError client-side).
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _repo_for_write(self, repo_type: str, repo_id: str) -> tuple[Repo, str]:
        user = self._user()
        repo = self.state.get_repo(repo_type, repo_id)
        if user is None:
            raise HubError(401, "Repository not found" if repo is None or repo.private else "Unauthorized",
                           "RepoNotFound" if repo is None or repo.private else None)
        if repo is None or (repo.private and not self._can_write(user, repo.namespace)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        if not self._can_write(user, repo.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo, user

    # ------------------------------------------------------------------ routing
    def _route(self, method: str, raw_path: str) -> None:
        seg = self.segments
        if seg and seg[0] == "api":
            return self._route_api(method, seg[1:])
        if len(seg) >= 3 and seg[0] == "_lfs" and seg[1] == "upload" and method == "PUT":
            return self._lfs_put(seg[2])
        # git lfs endpoints: /{prefix}{ns}/{name}.git/info/lfs/objects/{batch|verify}
        repo_type = "model"
        rest = seg
        if rest and rest[0] in ("datasets", "spaces"):
            repo_type = REPO_TYPES[rest[0]]
            rest = rest[1:]
        if len(rest) >= 6 and rest[1].endswith(".git") and rest[2:5] == ["info", "lfs", "objects"] and method == "POST":
            repo_id = f"{rest[0]}/{rest[1][:-4]}"
            if rest[5] == "batch":
                return self._lfs_batch(repo_type, repo_id)
            if rest[5] == "verify":
                return self._lfs_verify(repo_type, repo_id)
        # resolve: /{prefix}{ns}/{name}/resolve/{rev}/{path...}; rev is one URL segment (quoted)
        raw = raw_path.split("/")[1:]
        if raw and raw[0] in ("datasets", "spaces"):
            raw = raw[1:]
        if len(raw) >= 5 and raw[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = f"{unquote(raw[0])}/{unquote(raw[1])}"
            revision = unquote(raw[3])
            filename = "/".join(unquote(p) for p in raw[4:])
            return self._resolve(method, repo_type, repo_id, revision, filename)
        raise HubError(404, "Not found")

    def _route_api(self, method: str, seg: list[str]) -> None:
        if seg == ["whoami-v2"] and method == "GET":
            user = self._user()
            if user is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            return self._send_json({"type": "user", "name": user, "fullname": user,
                                    "orgs": [{"name": o, "type": "org"} for o in self.state.orgs.get(user, [])],
                                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})
        if seg == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml()
        if seg == ["repos", "delete"] and method == "DELETE":
            return self._delete_repo()
        if len(seg) >= 3 and seg[0] in REPO_TYPES:
            repo_type = REPO_TYPES[seg[0]]
            repo_id = f"{seg[1]}/{seg[2]}"
            rest = seg[3:]
            if len(rest) >= 1 and rest[0].startswith("xet-") and rest[0].endswith("-token"):
                raise HubError(501, "Xet storage is not supported by this test hub; set HF_HUB_DISABLE_XET=1")
            # HEAD answers like GET without a body, as the Hub does (mirrors such as olah probe
            # a repo's existence with HEAD /api/models/REPO).
            if not rest and method in ("GET", "HEAD"):
                return self._repo_info(repo_type, repo_id, "main")
            if len(rest) >= 2 and rest[0] == "revision" and method in ("GET", "HEAD"):
                return self._repo_info(repo_type, repo_id, "/".join(rest[1:]))
            if rest == ["refs"] and method == "GET":
                return self._refs(repo_type, repo_id)
            if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
                return self._tree(repo_type, repo_id, rest[1], "/".join(rest[2:]))
            if len(rest) == 2 and rest[0] == "paths-info" and method == "POST":
                return self._paths_info(repo_type, repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "commits" and method == "GET":
                return self._commits(repo_type, repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
                return self._preupload(repo_type, repo_id, rest[1])
            if len(rest) == 2 and rest[0] == "commit" and method == "POST":
                return self._commit(repo_type, repo_id, rest[1])
            if len(rest) >= 2 and rest[0] == "branch" and method in ("POST", "DELETE"):
                return self._branch(method, repo_type, repo_id, "/".join(rest[1:]))
            if len(rest) >= 2 and rest[0] == "tag" and method in ("POST", "DELETE"):
                return self._tag(method, repo_type, repo_id, "/".join(rest[1:]))
        raise HubError(404, "Not found")

    # ------------------------------------------------------------------ cards
    def _validate_yaml(self) -> None:
        """``/api/validate-yaml``: the client checks a README.md's YAML header before committing it."""
        import yaml

        content = (self._json_body() or {}).get("content", "")
        errors: list[dict] = []
        if content.startswith("---"):
            header = content.split("---", 2)[1] if content.count("---") >= 2 else None
            try:
                if header is None or not isinstance(yaml.safe_load(header) or {}, dict):
                    raise ValueError("the metadata block is not a YAML mapping")
            except (ValueError, yaml.YAMLError) as exc:
                errors.append({"message": f"Invalid YAML in README.md: {exc}"})
        if errors:
            raise HubError(400, errors[0]["message"])
        return self._send_json({"errors": [], "warnings": []})

    # ------------------------------------------------------------------ repos
    def _create_repo(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to create a repo")
        body = self._json_body() or {}
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
            raise HubError(400, "Invalid repo name")
        namespace = body.get("organization") or user
        if not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type}")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        repo_id = f"{namespace}/{name}"
        try:
            self.state.create_repo(repo_type, repo_id, private=private, author=user)
        except HubError as err:
            err.message = "You already created this model repo"
            err.extra_headers = {}
            url = f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}"
            self._send_json({"error": err.message, "url": url}, 409, {"X-Error-Message": err.message})
            return
        self._send_json({"url": f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}", "name": repo_id})

    def _delete_repo(self) -> None:
        user = self._user()
        body = self._json_body() or {}
        repo_type = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        repo, _ = self._repo_for_write(repo_type, repo_id)
        with self.state.lock:
            self.state.repos.pop((repo_type, repo_id), None)
        self._send_json({})

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        commit = self.state.resolve(repo, revision)
        blobs = "blobs" in self.query and self.query["blobs"][0].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.tree.items()):
            sib: dict = {"rfilename": path}
            if blobs:
                sib.update(size=entry.size, blobId=entry.blob_id)
                if entry.is_lfs:
                    sib["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256,
                                  "pointerSize": len(lfs_pointer(entry.lfs_sha256, entry.size))}
            siblings.append(sib)
        self._send_json({
            "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo.namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.tree.values()),
        })

    def _refs(self, repo_type: str, repo_id: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        with self.state.lock:
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c} for n, c in sorted(repo.branches.items())]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": c} for n, c in sorted(repo.tags.items())]
        self._send_json({"branches": branches, "converts": [], "tags": tags, "pullRequests": []})

    def _file_json(self, path: str, entry: Entry) -> dict:
        d = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
        if entry.is_lfs:
            d["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size,
                        "pointerSize": len(lfs_pointer(entry.lfs_sha256, entry.size))}
        return d

    def _tree(self, repo_type: str, repo_id: str, revision: str, base: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        commit = self.state.resolve(repo, revision)
        base = base.strip("/")
        recursive = (self.query.get("recursive", ["false"])[0]).lower() in ("1", "true")
        tree = commit.tree
        folders = _tree_folders(tree)
        if base and base not in folders:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound", )
        prefix = base + "/" if base else ""
        out = []
        for folder in sorted(folders):
            if not folder.startswith(prefix):
                continue
            rel = folder[len(prefix):]
            if recursive or "/" not in rel:
                out.append({"type": "directory", "oid": _folder_oid(tree, folder), "size": 0, "path": folder})
        for path in sorted(tree):
            if not path.startswith(prefix):
                continue
            rel = path[len(prefix):]
            if recursive or "/" not in rel:
                out.append(self._file_json(path, tree[path]))
        out.sort(key=lambda d: (d["type"] != "directory", d["path"]))
        self._send_json(out, headers={"X-Repo-Commit": commit.id})

    def _paths_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        commit = self.state.resolve(repo, revision)
        body = self._read_body()
        ctype = self.headers.get("Content-Type") or ""
        if "json" in ctype:
            paths = (json.loads(body or b"{}") or {}).get("paths", [])
        else:
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        folders = _tree_folders(commit.tree)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.tree:
                out.append(self._file_json(p, commit.tree[p]))
            elif p in folders:
                out.append({"type": "directory", "oid": _folder_oid(commit.tree, p), "size": 0, "path": p})
        self._send_json(out)

    def _commits(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        commit = self.state.resolve(repo, revision)
        out, seen = [], set()
        cur: Commit | None = commit
        with self.state.lock:
            while cur is not None and cur.id not in seen and len(out) < 10000:
                seen.add(cur.id)
                out.append({"id": cur.id, "title": cur.title, "message": cur.message, "date": cur.date,
                            "authors": [{"user": cur.author}], "parents": list(cur.parents)})
                cur = repo.commits.get(cur.parents[0]) if cur.parents else None
        self._send_json(out)

    def _branch(self, method: str, repo_type: str, repo_id: str, branch: str) -> None:
        repo, _ = self._repo_for_write(repo_type, repo_id)
        with self.state.lock:
            if method == "DELETE":
                if branch not in repo.branches:
                    raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                if branch == "main":
                    raise HubError(403, "Cannot delete the default branch")
                del repo.branches[branch]
                return self._send_json({})
            if branch in repo.branches:
                raise HubError(409, "Reference already exists")
            start = (self._json_body() or {}).get("startingPoint") or "main"
            repo.branches[branch] = self.state.resolve(repo, start).id
        self._send_json({})

    def _tag(self, method: str, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._repo_for_write(repo_type, repo_id)
        with self.state.lock:
            if method == "DELETE":
                if repo.tags.pop(revision, None) is None:
                    raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                return self._send_json({})
            tag = (self._json_body() or {}).get("tag")
            if not tag:
                raise HubError(400, "Missing tag")
            if tag in repo.tags:
                raise HubError(409, "Tag already exists")
            repo.tags[tag] = self.state.resolve(repo, revision).id
        self._send_json({})

    # ------------------------------------------------------------------ upload
    def _upload_mode(self, path: str, size: int) -> str:
        if size >= self.hub.lfs_threshold or path.endswith(LFS_SUFFIXES):
            return "lfs" if size > 0 else "regular"
        return "regular"

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, _ = self._repo_for_write(repo_type, repo_id)
        commit = None
        try:
            commit = self.state.resolve(repo, revision)
        except HubError:
            if unquote(revision) not in ("main",):
                raise
        body = self._json_body() or {}
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, "Invalid preupload payload")
        out = []
        for f in files:
            path, size = f.get("path"), int(f.get("size", 0))
            entry = commit.tree.get(path) if commit is not None else None
            out.append({"path": path, "uploadMode": self._upload_mode(path, size), "shouldIgnore": False,
                        "oid": (entry.lfs_sha256 or entry.blob_id) if entry is not None else None})
        self._send_json({"files": out, "commitOid": commit.id if commit else None})

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        repo, _ = self._repo_for_write(repo_type, repo_id)
        body = self._json_body() or {}
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        transfers = body.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise HubError(422, "Only the basic transfer adapter is supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid")), int(obj.get("size", -1))
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or size < 0:
                objects.append({"oid": oid, "size": max(size, 0), "error": {"code": 422, "message": "Invalid oid or size"}})
                continue
            with self.state.lock:
                present = oid in self.state.lfs and len(self.state.lfs[oid]) == size
                if not present:
                    ticket = secrets.token_hex(16)
                    self.state.upload_tickets[ticket] = (oid, size)
            if present:
                objects.append({"oid": oid, "size": size})
                continue
            objects.append({
                "oid": oid, "size": size, "authenticated": True,
                "actions": {
                    "upload": {"href": f"{self.hub.url}/_lfs/upload/{ticket}", "expires_in": 3600},
                    "verify": {"href": f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects/verify",
                               "header": {}},
                },
            })
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, ticket: str) -> None:
        with self.state.lock:
            info = self.state.upload_tickets.get(ticket)
        if info is None:
            raise HubError(403, "Invalid or expired upload URL")
        oid, size = info
        data = self._read_body()
        if len(data) != size:
            raise HubError(400, f"Size mismatch: expected {size}, got {len(data)}")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, "sha256 mismatch")
        with self.state.lock:
            self.state.lfs[oid] = data
            self.state.upload_tickets.pop(ticket, None)
        self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self, repo_type: str, repo_id: str) -> None:
        self._repo_for_write(repo_type, repo_id)
        body = self._json_body() or {}
        oid, size = body.get("oid"), body.get("size")
        with self.state.lock:
            data = self.state.lfs.get(oid)
        if data is None or len(data) != size:
            raise HubError(404, f"LFS object {oid} not found")
        self._send_json({"success": True})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        repo, user = self._repo_for_write(repo_type, repo_id)
        if "create_pr" in self.query:
            raise HubError(400, "Pull requests are not supported by the test hub")
        branch = unquote(revision)
        lines = [ln for ln in self._read_body().splitlines() if ln.strip()]
        try:
            items = [json.loads(ln) for ln in lines]
        except ValueError:
            raise HubError(400, "Invalid NDJSON payload")
        if not items or items[0].get("key") != "header":
            raise HubError(400, "First line of the commit payload must be the header")
        header = items[0].get("value") or {}
        with self.state.lock:
            if branch not in repo.branches:
                raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            parent = header.get("parentCommit")
            if parent is not None and parent != head.id:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(head.tree)
            for item in items[1:]:
                key, value = item.get("key"), item.get("value") or {}
                path = value.get("path")
                if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
                    raise HubError(400, f"Invalid path {path!r}")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, "Only base64 encoding is supported")
                    data = base64.b64decode(value.get("content", ""))
                    sha = git_blob_sha1(data)
                    self.state.blobs[sha] = data
                    tree[path] = Entry(size=len(data), blob_id=sha)
                elif key == "lfsFile":
                    oid = value.get("oid")
                    data = self.state.lfs.get(oid)
                    if data is None:
                        raise HubError(400, f"LFS file {path} ({oid}) was not uploaded")
                    size = value.get("size", len(data))
                    if size != len(data):
                        raise HubError(400, f"Size mismatch for LFS file {path}")
                    tree[path] = Entry(size=len(data), blob_id=git_blob_sha1(lfs_pointer(oid, len(data))),
                                       lfs_sha256=oid)
                elif key == "deletedFile":
                    if path not in tree:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del tree[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    victims = [p for p in tree if p.startswith(prefix)]
                    if not victims:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in victims:
                        del tree[p]
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            cid = self.state.new_commit_id(f"{repo_id}\n{head.id}\n{header.get('summary')}")
            repo.commits[cid] = Commit(id=cid, parents=[head.id], title=header.get("summary") or "",
                                       message=header.get("description") or "", date=_now_iso(),
                                       author=user, tree=tree)
            repo.branches[branch] = cid
        self._send_json({
            "success": True,
            "commitOid": cid,
            "commitUrl": f"{self.hub.url}/{URL_PREFIX[repo_type]}{repo_id}/commit/{cid}",
            "pullRequestUrl": None,
        })

    # ------------------------------------------------------------------ download
    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, filename: str) -> None:
        repo = self._repo_for_read(repo_type, repo_id)
        if repo.gated:
            # Like the Hub: metadata is public, file downloads of a gated repo need an account that
            # was granted access -- 401 anonymous, 403 otherwise, both X-Error-Code: GatedRepo.
            user = self._user()
            if user is None or not (self._can_write(user, repo.namespace) or user in repo.granted):
                raise HubError(401 if user is None else 403,
                               f"Access to model {repo_id} is restricted. You must have access to it "
                               "and be authenticated to access it. Please log in.", "GatedRepo")
        commit = self.state.resolve(repo, revision)
        entry = commit.tree.get(filename)
        if entry is None:
            err = HubError(404, "Entry not found", "EntryNotFound")
            err.extra_headers = {"X-Repo-Commit": commit.id}
            raise err
        data = self.state.content_of(entry)
        etag = entry.lfs_sha256 if entry.is_lfs else entry.blob_id
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f'inline; filename="{filename.rsplit("/", 1)[-1]}"',
        }
        if entry.is_lfs:
            headers["X-Linked-Etag"] = f'"{entry.lfs_sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        status, body = 200, data
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m or (m.group(1) == "" and m.group(2) == ""):
                raise HubError(416, "Invalid range")
            total = len(data)
            if m.group(1) == "":
                start, end = max(total - int(m.group(2)), 0), total - 1
            else:
                start = int(m.group(1))
                end = min(int(m.group(2)), total - 1) if m.group(2) else total - 1
            if start >= total or start > end:
                err = HubError(416, "Requested range not satisfiable")
                err.extra_headers = {"Content-Range": f"bytes */{total}"}
                raise err
            status, body = 206, data[start:end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        if method == "GET":
            decoded = "/" + "/".join(self.segments)
            rule = self.hub.faults.take("GET", decoded, ("drop", "truncate"))
            if rule is not None:
                keep = rule.keep_bytes if rule.keep_bytes is not None else len(body) // 2
                keep = max(0, min(keep, max(len(body) - 1, 0)))
                if rule.kind == "truncate":
                    self._send(status, body[:keep], headers, content_type="application/octet-stream")
                    return
                # drop: honest headers, partial body, then kill the connection
                self.send_response(status)
                for k, v in {**headers, "Content-Type": "application/octet-stream",
                             "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body[:keep])
                self.wfile.flush()
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
        self._send(status, body, headers, content_type="application/octet-stream")


# --------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    # Non-daemon handler threads are tracked by ThreadingMixIn and joined by server_close();
    # stop() first shuts down every open connection so those joins cannot block.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True

    def __init__(self, addr, handler, hub: "HubServer"):
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def track(self, conn: socket.socket, add: bool) -> None:
        with self._conns_lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def handle_error(self, request, client_address) -> None:
        import sys

        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return  # client went away / idle keep-alive timed out: expected, stay quiet
        self.hub.errors.append(repr(exc))

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HubServer:
    """In-process fake Hub. ``url`` is valid after :meth:`start`."""

    DEFAULT_TOKEN = "hf_deltahub_test_token"
    DEFAULT_USER = "testuser"

    def __init__(self, tokens: dict[str, str] | None = None, orgs: dict[str, list[str]] | None = None,
                 lfs_threshold: int = LFS_THRESHOLD):
        self.state = HubState(tokens if tokens is not None else {self.DEFAULT_TOKEN: self.DEFAULT_USER}, orgs)
        self.faults = Faults()
        self.lfs_threshold = lfs_threshold
        self.requests: list[tuple[str, str]] = []  # (method, decoded path), bounded
        self.errors: list[str] = []  # unexpected handler exceptions
        self._req_lock = threading.Lock()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def log_request(self, method: str, path: str) -> None:
        with self._req_lock:
            if len(self.requests) < 10000:
                self.requests.append((method, path))

    def count(self, method: str, pattern: str) -> int:
        rx = re.compile(pattern)
        with self._req_lock:
            return sum(1 for m, p in self.requests if m == method and rx.search(p))

    def start(self) -> "HubServer":
        self._httpd = _Server(("127.0.0.1", 0), HubHandler, self)
        host, port = self._httpd.server_address[:2]
        self.url = f"http://{host}:{port}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hub-server-{port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.close_all_connections()
        self._httpd.server_close()  # joins handler threads (block_on_close)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # convenience passthroughs
    def create_repo(self, repo_id: str, *, repo_type: str = "model", private: bool = False) -> Repo:
        return self.state.create_repo(repo_type, repo_id, private=private)

    def tamper(self, repo_id: str, path: str, data: bytes | None = None, *, revision: str = "main",
               repo_type: str = "model") -> None:
        self.state.tamper(repo_type, repo_id, path, data, revision)

    def resolve_url(self, repo_id: str, filename: str, revision: str = "main", repo_type: str = "model") -> str:
        return f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}/resolve/{quote(revision, safe='')}/{quote(filename)}"
