"""Where a config's files live, as Settings (common/config.py): a local path, or a label store that may
be at a URL. A URL given where a local path is meant would become a local folder named ``s3:/b/x``
without a word, so it is refused in the config, for Python callers as for flags."""
from __future__ import annotations

import os
import re

from ..config import Setting
from ..errors import MealV2Error
from .lease import writable_url
from .objects import READ_BY, check_url, is_url, redact


# A protocol followed by ':' or ':/' but not '://' ('s3:/bucket/x'): taken as a path, it is a folder named 's3:'.
_URL_TYPO = re.compile(r"^(s3|s3a|gs|gcs|az|abfs|abfss|adl|http|https|hf|ftp|sftp|file):/?(?!/)", re.IGNORECASE)


class LocalPath(Setting):
    """A local or mounted path: data, runs, checkpoints, class files."""

    expected = "a local path"

    def problem(self, value) -> str | None:
        return None if isinstance(value, (str, os.PathLike)) else "is not a path"

    def show(self, value) -> str:
        return redact(value) if is_url(value) else str(value)

    def refusal(self, value) -> str | None:
        if is_url(value):
            return (f"{redact(value)} is a URL; here mealv2 takes a local path: URLs are taken only as label stores "
                    f"({READ_BY}). Mount it (e.g. s3fs, gcsfuse) or copy it, and pass the local path")
        if isinstance(value, str) and (typo := _URL_TYPO.match(value)):
            return (f"{value} reads as a local folder named '{typo[1]}:', likely a mistyped URL; write "
                    f"{typo[1]}://{value[typo.end():]} for the URL, or ./{value} for a local folder of that name")
        return super().refusal(value)


class StorePath(LocalPath):
    """A label store: a local path, or a URL that common/store/objects.py reads (https://, s3://, other fsspec
    protocols); ``write``: a store to write, a local path or a URL whose protocol has a lease (s3://)."""

    def __init__(self, write: bool = False):
        self.write = write
        self.expected = f"a local path or a store URL{' with a lease (s3://)' if write else ''}"

    def parse(self, text: str) -> str:
        return text.rstrip("/") if is_url(text) else text

    def refusal(self, value) -> str | None:
        if not is_url(value):
            return super().refusal(value)
        try:
            writable_url(value, MealV2Error) if self.write else check_url(value)
        except MealV2Error as e:
            return str(e)
        return None


LOCAL_PATH = LocalPath()
