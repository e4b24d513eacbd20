"""A GCS bucket on localhost for tests: ``gcp-storage-emulator`` plus generation preconditions.

The emulator serves the GCS JSON API that Orbax (through tensorstore and etils epath/gcsfs),
tensorboardX and google-cloud-storage speak, but it ignores ``ifGenerationMatch``, on which the
workdir lease depends (create only if absent, rewrite or delete only one's own generation), and
its downloads lack the ``x-goog-generation`` header, without which tensorstore cannot update an
OCDBT manifest ("Malformed StorageGeneration"). Here uploads, deletes and downloads that name a
generation get GCS's answer, ``412 Precondition Failed`` when the object's generation differs
(0: the object must not exist), and downloads carry their generation. The server handles one
request at a time, so a check and the write that follows it are atomic.

Run as ``python -m tests.gcs_emulator --port=PORT --bucket=NAME``; ``gcs_env`` gives the
environment that points every client at it.

Example:
  >>> env = gcs_env(9023)    # STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL, ...
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import time
import urllib.parse
import urllib.request
from http import HTTPStatus


def gcs_env(port: int) -> dict[str, str]:
  """Environment variables that send the Google clients and tensorstore to the emulator."""
  url = f"http://127.0.0.1:{port}"
  return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
          "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "emulator",
          "GCE_METADATA_HOST": "127.0.0.1:1", "NO_GCE_CHECK": "True",
          # gcsfs would ask the (absent) control plane for the bucket's layout, warning each time.
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


def create_bucket(port: int, bucket: str, timeout_s: float = 30.0) -> None:
  """Creates ``bucket``, retrying until the server answers (it may still be starting)."""
  deadline = time.monotonic() + timeout_s
  body = json.dumps({"name": bucket}).encode()
  while True:
    try:
      request = urllib.request.Request(f"http://127.0.0.1:{port}/storage/v1/b?project=emulator",
                                       data=body, headers={"Content-Type": "application/json"})
      urllib.request.urlopen(request, timeout=5).read()
      return
    except OSError:
      if time.monotonic() > deadline:
        raise
      time.sleep(0.1)


def _object_name(request) -> str | None:
  name = request.params.get("object_id") if request.params else None
  if name is None and "name" in request.query:
    name = request.query["name"][0]
  if name is None and isinstance(request.data, dict):
    name = (request.data.get("meta") or {}).get("name") or request.data.get("name")
  return urllib.parse.unquote(name) if name else None


def _with_precondition(handler, objects_module):
  """``handler`` that first answers 412 when ``ifGenerationMatch`` names another generation."""

  @functools.wraps(handler)
  def checked(request, response, storage, *args, **kwargs):
    wanted = request.query.get("ifGenerationMatch")
    name = _object_name(request)
    if wanted and name is not None:
      try:
        current = int(storage.get_file_obj(request.params["bucket_name"], name)["generation"])
      except objects_module.NotFound:
        current = 0
      if int(wanted[0]) != current:
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "conditionNotMet"}})
        return None
    return handler(request, response, storage, *args, **kwargs)

  return checked


def _with_generation_header(handler, objects_module):
  """``handler`` (a read) that also sends ``x-goog-generation``, as GCS does: tensorstore takes a
  read's generation from it (``GET .../o/NAME?alt=media`` as well as the download endpoint)."""

  @functools.wraps(handler)
  def with_header(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    except objects_module.NotFound:
      pass
    return handler(request, response, storage, *args, **kwargs)

  return with_header


def serve(port: int, bucket: str) -> None:
  """Runs the emulator with preconditions on ``port`` (in memory) with ``bucket``, until killed."""
  from gcp_storage_emulator import server  # pylint: disable=import-outside-toplevel
  from gcp_storage_emulator.handlers import objects  # pylint: disable=import-outside-toplevel

  checked = {f: _with_precondition(f, objects)
             for f in (objects.insert, objects.delete, objects.upload_partial)}
  for read in (objects.download, objects.get):
    checked[read] = _with_precondition(_with_generation_header(read, objects), objects)
  for _, handlers in server.HANDLERS:
    for method, f in list(handlers.items()):
      if f in checked:
        handlers[method] = checked[f]
  objects.insert = checked[objects.insert]     # the router also looks it up by name
  logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
  emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  emulator.run()


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--port", type=int, required=True)
  parser.add_argument("--bucket", required=True)
  args = parser.parse_args()
  serve(args.port, args.bucket)
