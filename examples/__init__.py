"""Example applications built on sqla-tenancy: the same small SaaS API twice, for Flask
(``python -m examples.flask_app``) and FastAPI (``python -m examples.fastapi_app``).

:mod:`examples.common` holds what both share (models, demo data, settings, request helpers);
:mod:`examples.launch` starts a demo environment on a private PostgreSQL for the one-line commands.
"""
