"""``/v1/files`` through the ``openai`` SDK on the session server (upload, list with its
auto-pagination, retrieve, content, delete, expires_after), plus raw httpx for what the SDK
cannot send: the 413 limit (a second app with ``max_upload_mb=1``), path-traversal and control
characters in filenames, non-JSONL batch files, bad fields and ids, and persistence across a
new app on the same ``LMFORGE_HOME``."""

from __future__ import annotations

import time

import httpx
import openai
import pytest
from support.serving import serve

from lmforge.config import ServerConfig
from lmforge.jobs.schema import FILES
from lmforge.jobs.store import Store
from lmforge.server import build_app
from lmforge.server.uploads import safe_filename

BATCH_LINES = b'{"custom_id": "a", "method": "POST"}\n\n{"custom_id": "b"}\n'


def upload(http: httpx.Client, name: str, data: bytes, purpose: str = "user_data",
           **fields: str) -> httpx.Response:
    return http.post("/v1/files", data={"purpose": purpose, **fields},
                     files={"file": (name, data)})


def assert_error(resp: httpx.Response, status: int, param: str | None) -> str:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    return error["message"]


def test_upload_retrieve_content_delete(client, tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_bytes(BATCH_LINES)
    with open(path, "rb") as f:
        created = client.files.create(file=f, purpose="batch")
    assert created.id.startswith("file-") and created.object == "file"
    assert (created.bytes, created.filename, created.purpose) == (len(BATCH_LINES),
                                                                  "requests.jsonl", "batch")
    assert created.status == "processed" and created.status_details is None
    assert created.expires_at is None and abs(created.created_at - time.time()) < 60
    assert client.files.retrieve(created.id) == created
    assert client.files.content(created.id).read() == BATCH_LINES
    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.object, deleted.deleted) == (created.id, "file", True)
    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError, match=f"No such File object: {created.id}"):
            call(created.id)


def test_list_pages_both_orders(client, http):
    ids = [client.files.create(file=(f"e{i}.jsonl", b"{}\n"), purpose="evals").id
           for i in range(3)]
    newest_first = ids[::-1]
    page = client.files.list(purpose="evals", limit=2)
    assert [f.id for f in page.data] == newest_first[:2] and page.has_more
    assert [f.id for f in client.files.list(purpose="evals", limit=2)] == newest_first
    assert [f.id for f in client.files.list(purpose="evals", order="asc", limit=1)] == ids
    assert [f.id for f in client.files.list(purpose="evals", order="asc", after=ids[0])
            ] == ids[1:]
    body = http.get("/v1/files", params={"purpose": "evals", "limit": 2}).json()
    assert set(body) == {"object", "data", "first_id", "last_id", "has_more"}
    assert (body["object"], body["first_id"], body["last_id"], body["has_more"]) == (
        "list", newest_first[0], newest_first[1], True)
    last = http.get("/v1/files", params={"purpose": "evals", "after": ids[0]}).json()
    assert last["data"] == [] and last["first_id"] is None and not last["has_more"]
    assert {f.id for f in client.files.list()} >= set(ids)  # unfiltered, default limit
    for file_id in ids:
        client.files.delete(file_id)
    assert client.files.list(purpose="evals").data == []


@pytest.mark.parametrize("params,param", [
    ({"limit": 0}, "limit"), ({"limit": 10001}, "limit"), ({"limit": "x"}, "limit"),
    ({"order": "newest"}, "order"), ({"purpose": "nope"}, "purpose"),
    ({"after": "file-missing"}, "after")])
def test_list_rejects_bad_parameters(http, params, param):
    assert_error(http.get("/v1/files", params=params), 400, param)


def test_expires_after(client, http):
    created = client.files.create(file=("x.txt", b"x"), purpose="user_data",
                                  expires_after={"anchor": "created_at", "seconds": 3600})
    assert created.expires_at == created.created_at + 3600
    assert client.files.retrieve(created.id).expires_at == created.expires_at
    client.files.delete(created.id)
    for fields, param in [({"expires_after[seconds]": "60"}, "expires_after.seconds"),
                          ({"expires_after[seconds]": "2592001"}, "expires_after.seconds"),
                          ({"expires_after[anchor]": "now",
                            "expires_after[seconds]": "3600"}, "expires_after.anchor")]:
        fields.setdefault("expires_after[anchor]", "created_at")
        assert_error(upload(http, "x.txt", b"x", **fields), 400, param)


def test_an_expired_file_is_gone(client, http):
    store = Store()  # the session app's database and files (same LMFORGE_HOME)
    kept = client.files.create(file=("k.txt", b"k"), purpose="vision")
    gone = [client.files.create(file=("g.txt", b"g"), purpose="vision",
                                expires_after={"anchor": "created_at", "seconds": 3600})
            for _ in range(2)]
    with store.db.begin() as conn:  # as if an hour had passed
        conn.execute(FILES.update().where(FILES.c.id.in_([g.id for g in gone]))
                     .values(expires_at=int(time.time()) - 1))
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(gone[0].id)
    assert [f.id for f in client.files.list(purpose="vision")] == [kept.id]  # purges gone[1]
    assert not any(store.path(g.id).exists() for g in gone)
    assert store.get_file(gone[1].id) is None
    client.files.delete(kept.id)
    store.close()


def test_batch_files_must_be_jsonl(http):
    cases = [(b'{"a": 1}\n\n[1, 2]\n', "Line 3", "JSON array"),
             (b'{"a": 1}\n{"a": \n', "Line 2", "not valid JSON"),
             (b'"text"', "Line 1", "JSON string"),
             (b'{"a": 1}\n\xff\xfe\n', "Line 2", "not UTF-8")]
    for purpose in ("batch", "fine-tune"):
        for data, where, why in cases:
            message = assert_error(upload(http, "bad.jsonl", data, purpose), 400, "file")
            assert where in message and why in message and purpose in message, message
    resp = upload(http, "ok.jsonl", b'\xef\xbb\xbf{"a": 1}\r\n\n{"b": 2}', "batch")  # BOM, CRLF
    assert resp.status_code == 200, resp.text
    http.delete(f"/v1/files/{resp.json()['id']}")
    resp = upload(http, "notes.txt", b"[not json", "user_data")  # other purposes: any bytes
    assert resp.status_code == 200 and resp.json()["bytes"] == 9
    http.delete(f"/v1/files/{resp.json()['id']}")


def test_bad_uploads_name_the_field(http):
    assert "purpose" in assert_error(upload(http, "a.txt", b"a", "nope"), 400, "purpose")
    assert_error(upload(http, "a.txt", b"a", "batch_output"), 400, "purpose")  # server-only
    assert_error(http.post("/v1/files", files={"file": ("a.txt", b"a")}), 400, "purpose")
    assert_error(http.post("/v1/files", files={"purpose": (None, "batch")}), 400, "file")
    message = assert_error(upload(http, "a.txt", b"a", color="red"), 400, "color")
    assert "Unrecognized request argument" in message
    assert_error(http.post("/v1/files", json={"purpose": "batch"}), 400, None)
    assert "longer than 64 KiB" in assert_error(upload(http, "a.txt", b"a", note="n" * 70000),
                                                400, "note")
    cut = (b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
           b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\n{}")
    resp = http.post("/v1/files", content=cut,
                     headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert "cut short" in assert_error(resp, 400, None)


@pytest.mark.parametrize("file_id", ["file-abc", "file-" + "0" * 24, "x" * 300])
def test_unknown_ids_are_404(http, file_id):
    for method, suffix in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
        resp = http.request(method, f"/v1/files/{file_id}{suffix}")
        assert resp.status_code == 404, resp.text
        error = resp.json()["error"]
        assert error["message"].startswith("No such File object: ")
        assert error["type"] == "invalid_request_error"


def raw_upload(http: httpx.Client, filename: bytes, data: bytes = b"x") -> httpx.Response:
    """A multipart body written by hand, so the filename's bytes arrive exactly as given."""
    body = (b"--B0\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nuser_data\r\n"
            b"--B0\r\nContent-Disposition: form-data; name=\"file\"; filename=\"" + filename
            + b"\"\r\nContent-Type: text/plain\r\n\r\n" + data + b"\r\n--B0--\r\n")
    return http.post("/v1/files", content=body,
                     headers={"Content-Type": "multipart/form-data; boundary=B0"})


@pytest.mark.parametrize("raw,kept", [
    (b"../../evil.txt", "evil.txt"), (b"..\\\\..\\\\win.ini", "win.ini"),
    (b"/etc/passwd", "passwd"), (b"..", "upload"), (b"a\x1b[31mb\x7f\tc.txt", "a[31mbc.txt"),
    ("d\u202eonn\u00e9es.jsonl".encode(), "donn\u00e9es.jsonl"),
    (b"n" * 300 + b".jsonl", "n" * 249 + ".jsonl")])
def test_filenames_are_sanitized(http, raw, kept):
    resp = raw_upload(http, raw)
    assert resp.status_code == 200, resp.text
    file = resp.json()
    assert file["filename"] == kept
    store = Store()
    assert store.path(file["id"]).read_bytes() == b"x"  # stored under its id, nowhere else
    download = http.get(f"/v1/files/{file['id']}/content")
    assert download.content == b"x" and "attachment" in download.headers["content-disposition"]
    http.delete(f"/v1/files/{file['id']}")
    store.close()


def test_safe_filename_edges():
    assert safe_filename("") == safe_filename(" . ") == "upload"
    assert safe_filename("x" * 300) == "x" * 255
    assert safe_filename("a." + "e" * 300) == ("a." + "e" * 300)[:255]  # no extension to keep


@pytest.fixture(scope="module")
def small_limit(engine, base_url, tmp_path_factory):
    """A second app on the session engine with a 1 MB upload limit and its own store."""
    store = Store(home=tmp_path_factory.mktemp("small_limit_home"))
    with serve(build_app(engine, ServerConfig(max_upload_mb=1), store=store),
               lifespan="off") as url:
        yield url, store
    store.close()


def test_uploads_over_the_limit_are_413(small_limit):
    url, store = small_limit
    mb = 2**20

    def chunked(total: int):  # no Content-Length: the server must count
        for _ in range(total // (64 * 1024)):
            yield b"{}\n" + b" " * (64 * 1024 - 3)

    with httpx.Client(base_url=url, timeout=30) as http:
        ok = upload(http, "fits.bin", b"x" * mb)  # exactly the limit
        assert ok.status_code == 200 and ok.json()["bytes"] == mb, ok.text
        for data in (b"x" * (mb + 1), b"x" * (3 * mb)):  # counted / refused by Content-Length
            message = assert_error(upload(http, "big.bin", data), 413, "file")
            assert "upload limit of 1 MB" in message and "--max-upload-mb" in message
        body = (b"--B1\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                b"--B1\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s\"\r\n\r\n")
        resp = http.post("/v1/files", content=iter([body, *chunked(3 * mb)]),
                         headers={"Content-Type": "multipart/form-data; boundary=B1"})
        assert "content-length" not in resp.request.headers
        assert_error(resp, 413, "file")
        assert http.get("/v1/files").json()["data"] == [ok.json()]  # the connection still works
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        sdk.files.create(file=("big.jsonl", b"{}\n" * mb), purpose="batch")
    assert refused.value.status_code == 413
    leftovers = [p.name for p in store.files_dir.iterdir() if p.name != ok.json()["id"]]
    assert leftovers == []  # no temporary file outlives a refused upload


def test_files_survive_a_new_app_on_the_same_home(engine, client):
    created = client.files.create(file=("keep.jsonl", b'{"k": 1}\n'), purpose="batch")
    with serve(build_app(engine, ServerConfig()), lifespan="off") as url:
        other = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert other.files.retrieve(created.id) == created
        assert other.files.content(created.id).read() == b'{"k": 1}\n'
        other.files.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)
