"""/v1/datasets: upload a JSONL or CSV file (validated line by line), list and read a team's uploads.

An upload is used in a job spec as ``"dataset": {"name": "upload:<id>"}``.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from api.deps import DatasetDep, SessionDep, SettingsDep, TeamDep, TeamIdDep, in_session, team_for_write
from api.schemas import DatasetPublic, DatasetsPublic, DatasetUploadForm, ErrorPublic, error_responses
from service import uploads

router = APIRouter(prefix="/datasets", tags=["datasets"], responses=error_responses(400, 401, 404, 422))

# Room for the multipart framing and the small form fields around the file itself.
FORM_OVERHEAD = 64 * 1024


def _upload_schema() -> dict[str, Any]:
    schema = DatasetUploadForm.model_json_schema()
    schema["properties"] = {
        "file": {"type": "string", "format": "binary", "description": "a .jsonl or .csv file"},
        **schema["properties"],
    }
    schema["required"] = ["file"]
    return schema


async def _bounded_form(request: Request, limit: int, limit_mb: int) -> FormData:
    """Parse the multipart body, giving up as soon as it outgrows ``limit`` bytes.

    The endpoint declares no form parameters so that FastAPI does not read the body before this
    runs; file parts are spooled to disk by Starlette, so memory stays bounded either way.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FORM_OVERHEAD:
        raise uploads.UploadTooLarge(limit_mb)
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit + FORM_OVERHEAD:  # chunked bodies declare no length
                raise uploads.UploadTooLarge(limit_mb)
        return message

    return await Request(request.scope, receive).form(max_files=1, max_fields=20)


def _invalid(loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": ("body", *loc), "msg": msg, "type": kind}])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetPublic,
    openapi_extra={
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": _upload_schema()}}}
    },
    responses={
        413: {"model": ErrorPublic, "description": "the file is over W2S_MAX_UPLOAD_MB"},
        422: {"model": ErrorPublic, "description": "invalid rows: up to 20 errors, each naming its line"},
    },
)
async def upload_dataset(request: Request, team_id: TeamIdDep, settings: SettingsDep) -> DatasetPublic:
    """Upload a binary-classification dataset as multipart/form-data: ``file`` (JSONL or CSV with a
    header row, UTF-8), ``name``, ``text_column`` [text], ``label_column`` [label] (0/1/true/false),
    ``format`` [from the file name]. At least 10 rows with both labels."""
    try:
        form = await _bounded_form(request, settings.max_upload_mb * uploads.MIB, settings.max_upload_mb)
        try:
            file = form.get("file")
            if not isinstance(file, UploadFile):
                raise _invalid(("file",), "a file is required: send multipart/form-data with a 'file' part")
            try:
                fields = DatasetUploadForm.model_validate(
                    {key: value for key, value in form.items() if key != "file" and isinstance(value, str)}
                )
            except ValidationError as error:
                raise RequestValidationError(
                    [{**item, "loc": ("body", *item["loc"])} for item in error.errors(include_url=False)]
                ) from None

            def store(session: Session) -> DatasetPublic:
                # Stored, counted against the quota (under the team's lock) and committed in one
                # thread hand-off: parallel uploads cannot all pass a count only one of them fits.
                file.file.seek(0)  # from the start, also when a lost race runs this again
                dataset = uploads.create_dataset(
                    session,
                    team=team_for_write(session, team_id),
                    settings=settings,
                    source=file.file,
                    filename=file.filename or "",
                    name=fields.name,
                    text_column=fields.text_column,
                    label_column=fields.label_column,
                    format=fields.format,
                )
                return DatasetPublic.model_validate(dataset)

            public = await in_session(store)
        finally:
            await form.close()
    except uploads.UploadTooLarge as error:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, str(error)) from None
    except uploads.InvalidUpload as error:
        detail = [
            {"loc": ["body", "file"], "line": line, "msg": msg, "type": "dataset"}
            for line, msg in error.errors
        ]
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, detail) from None
    return public


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep,
    team: TeamDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> DatasetsPublic:
    """The team's uploads, newest first."""
    rows, next_cursor = uploads.list_datasets(session, team_id=team.id, limit=limit, cursor=cursor)
    return DatasetsPublic(data=[DatasetPublic.model_validate(row) for row in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def read_dataset(dataset: DatasetDep) -> DatasetPublic:
    return DatasetPublic.model_validate(dataset)


@router.delete("/{dataset_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(409))
def delete_dataset(dataset: DatasetDep, session: SessionDep, settings: SettingsDep) -> None:
    """Delete one of your uploads (and its file). 409 while a job that has not ended uses it."""
    uploads.delete_dataset(session, dataset=dataset, settings=settings)
