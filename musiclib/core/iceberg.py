"""The Iceberg catalog musiclib's tables live in: chosen by one URI, shared by every stage that writes a table.

The catalog (``--catalog-uri``, else ``MUSICLIB_TAG_CATALOG``):

- empty, local root: a SQLite file under the root, ``sqlite:///<root>/tags/iceberg.db``;
- empty, S3 root: a SQLite file on the machine that runs the job, ``~/.musiclib/iceberg/<bucket>/<key>/
  iceberg.db``: fine for one machine, but other machines do not see it, so a cluster names a shared one;
- ``http://…`` or ``https://…``: an Iceberg REST catalog; ``glue``: AWS Glue; any other URI is a
  SQLAlchemy URL (``postgresql://…``, ``sqlite:///…``).

S3 settings come from the standard AWS variables; credentials are found by the AWS SDK on the machine
that uses them and never pass through musiclib. A catalog's own secrets (a REST token, say) go in
pyiceberg's variables, ``PYICEBERG_CATALOG__MUSICLIB__<PROPERTY>``; a password inside the URI is never
printed (``masked``).
"""

from __future__ import annotations

import os

from pyiceberg.catalog import Catalog, load_catalog
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from musiclib.core import storage

DEFAULT_CATALOG = os.environ.get("MUSICLIB_TAG_CATALOG", "")
CATALOG_NAME = "musiclib"  # pyiceberg reads PYICEBERG_CATALOG__MUSICLIB__* for this catalog
S3_CATALOG_DIR = "~/.musiclib/iceberg"  # where an S3 root's default SQLite catalog lives


def resolved(catalog_uri: str, root: str) -> str:
    """The catalog URI in use: the one given, else the default for the root (see the module doc)."""
    if catalog_uri:
        return catalog_uri
    scheme, path = storage.split_uri(root)
    if scheme == "s3":
        return "sqlite:///" + os.path.join(os.path.expanduser(S3_CATALOG_DIR), path, "iceberg.db")
    return "sqlite:///" + os.path.join(path, "tags", "iceberg.db")


def catalog_problem(catalog_uri: str) -> str | None:
    """Why a ``--catalog-uri`` names no catalog, or None. A value with ``@`` (maybe a password) is not echoed."""
    if catalog_uri in ("", "glue") or catalog_uri.startswith(("http://", "https://")):
        return None
    try:
        make_url(catalog_uri)
    except ArgumentError:
        shown = "a value with '@'" if "@" in catalog_uri else repr(catalog_uri)
        return (
            f"--catalog-uri must be https://... (a REST catalog), glue, or a SQLAlchemy URL such as "
            f"sqlite:///path/iceberg.db or postgresql://host/db; got {shown}"
        )
    return None


def masked(catalog_uri: str) -> str:
    """A catalog URI with the password of a SQLAlchemy URL replaced by ``***``."""
    if "://" in catalog_uri and not catalog_uri.startswith(("http://", "https://")):
        return make_url(catalog_uri).render_as_string(hide_password=True)
    return catalog_uri


def open_catalog(catalog_uri: str, root: str, warehouse: str, create: bool) -> Catalog | None:
    """The pyiceberg catalog for ``root`` with its data under ``warehouse``; None for a SQLite catalog whose
    file does not exist and is not to be made."""
    uri = resolved(catalog_uri, root)
    props: dict[str, str] = {"warehouse": warehouse}
    if uri.startswith(("http://", "https://")):
        props |= {"type": "rest", "uri": uri}
    elif uri == "glue":
        props |= {"type": "glue"}
    else:
        props |= {"type": "sql", "uri": uri}
        if uri.startswith("sqlite:///"):
            path = make_url(uri).database or ""
            if not create and not os.path.exists(path):
                return None
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if storage.split_uri(root)[0] == "s3":
        s3 = storage.s3_settings()  # endpoint and region only: credentials stay with the AWS SDK
        props |= {k: v for k, v in (("s3.endpoint", s3["endpoint_url"]), ("s3.region", s3["region"])) if v}
    return load_catalog(CATALOG_NAME, **props)
