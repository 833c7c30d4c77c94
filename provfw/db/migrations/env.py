"""Alembic environment of provfw's schema.

The database comes from, in order: an open ``config.attributes['connection']``,
``config.attributes['url']`` (provfw.db.migration sets it), ``-x url=...`` on
the alembic command line, ``sqlalchemy.url`` in the ini file, and last
provfw's own default (``[database] connection`` or SQLite under state_path).
"""

from alembic import context

from provfw.db.sqlalchemy import models

config = context.config
target_metadata = models.Base.metadata


def _url() -> str:
    url = (config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url")
           or config.get_main_option("sqlalchemy.url"))
    if not url:
        from provfw import conf
        url = conf.database_url()
    return url


def _include_object(dialect: str):
    """alembic's ``include_object`` hook: leave out of the comparison the foreign keys ``dialect`` enforces
    with triggers (``models.TRIGGERED_FOREIGN_KEYS``)."""
    triggered = models.TRIGGERED_FOREIGN_KEYS.get(dialect, frozenset())

    def include(_obj, name, type_, _reflected, _compare_to) -> bool:
        return not (type_ == "foreign_key_constraint" and name in triggered)
    return include


def run_migrations_offline() -> None:
    import sqlalchemy as sa
    url = _url()
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True,
                      compare_type=True, render_as_batch=True,
                      include_object=_include_object(sa.engine.make_url(url).get_backend_name()))
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from provfw.db.sqlalchemy.api import create_engine
    engine = create_engine(_url())
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()


def _run(connection) -> None:
    # render_as_batch: SQLite cannot ALTER constraints in place; batch mode copies the table.
    context.configure(connection=connection, target_metadata=target_metadata, compare_type=True,
                      render_as_batch=True, include_object=_include_object(connection.dialect.name))
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
