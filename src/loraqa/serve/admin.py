"""Loading and unloading LoRA adapters while serving, behind the admin key:

    POST /v1/load_lora_adapter   {"lora_name": NAME, "lora_path": FOLDER}
    POST /v1/unload_lora_adapter {"lora_name": NAME}

(vLLM's routes and bodies). A folder is loaded only from under the server's ``--adapter-root``
(a relative path is taken from there; links are followed before the check), so the admin key does
not open every folder the process can read. An adapter is read and checked off the decoding
thread, then attached between two batches; unloading stops new requests for it at once, fails those
waiting, and removes its matrices between two batches (a request admitted for it and not yet
decoded is refused there: ``serve.batcher``). A refusal names the path as the client sent it.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from loraqa.io import log
from loraqa.serve.request import RequestError, parse_json
from loraqa.serve.service import Service


def under_root(root: str | None, path: str) -> str:
    """``path`` resolved under ``root``; ``RequestError`` 403 outside it, or with no root."""
    if root is None:
        raise RequestError(403, "this server loads adapters only from under --adapter-root, which it was not given")
    base = Path(root).resolve()
    resolved = (base / path).resolve()
    if resolved != base and base not in resolved.parents:
        raise RequestError(403, f"lora_path {path!r} is outside this server's --adapter-root")
    return str(resolved)


def _read(service: Service, name: str, path: str):
    """The adapter read and checked (on the loader thread), every failure a 400 in one line."""
    resolved = under_root(service.adapter_root, path)
    try:
        return service.answerer.adapters.read(name, resolved)
    except ValueError as e:
        raise RequestError(400, str(e).replace(resolved, path)) from None
    except Exception as e:  # noqa: BLE001 - damaged files (OSError, safetensors', unpickling): the log has why
        rid = uuid.uuid4().hex[:12]
        log(f"request {rid}: adapter {name!r} from {resolved} could not be read: {type(e).__name__}: {e}")
        raise RequestError(400, f"adapter {name!r}: its files could not be read ({type(e).__name__}; "
                                f"request {rid} in the server's log)") from None


async def load_adapter(service: Service, request):
    from starlette.responses import JSONResponse

    try:
        body = await service.off_loop(parse_json, await service.body_of(request, "admin"))
        name, path = (body.get("lora_name"), body.get("lora_path")) if isinstance(body, dict) else (None, None)
        if not isinstance(name, str) or not isinstance(path, str):
            raise RequestError(400, "send {\"lora_name\": NAME, \"lora_path\": FOLDER}")
        if service.answerer.adapters is None:
            raise RequestError(400, "this server holds one merged model; start it with --adapter NAME=PATH "
                                    "or an admin key to load adapters")
        async with service.admin:
            read = await asyncio.get_running_loop().run_in_executor(service.loader, _read, service, name, path)
            await service.batcher.between_batches(lambda: service.answerer.attach(read))
    except Exception as e:  # noqa: BLE001
        return service.respond(e)
    log(f"loaded adapter {name} from {path}")
    return JSONResponse({"status": "loaded", "lora_name": name, "models": service.models()})


async def unload_adapter(service: Service, request):
    from starlette.responses import JSONResponse

    try:
        body = await service.off_loop(parse_json, await service.body_of(request, "admin"))
        name = body.get("lora_name") if isinstance(body, dict) else None
        adapters = service.answerer.adapters
        async with service.admin:
            if adapters is None or name not in adapters.names:
                raise RequestError(404, f"no adapter {name!r} is loaded")
            handle = adapters.retire(name)  # no longer listed, nor given to new requests
            service.batcher.drop_adapter(handle, RequestError(404, f"the model {name!r} was unloaded"))
            passages = service.answerer.passages  # what it computed is never read again: freed with it
            await service.batcher.between_batches(lambda: (adapters.detach(handle), passages and passages.drop(handle)))
    except Exception as e:  # noqa: BLE001
        return service.respond(e)
    log(f"unloaded adapter {name}")
    return JSONResponse({"status": "unloaded", "lora_name": name, "models": service.models()})
