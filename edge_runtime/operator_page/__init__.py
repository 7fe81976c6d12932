"""The operator's page: live view, history, counters and feedback, served by the daemon (optional extra `page`).

`config` (station-file section, importable without the extra), `auth` (roles, hashed passwords, sessions, CSRF),
`part_history` (the output-bus sink that keeps recent parts), `feedback` (learn / store defect / recalibrate /
rollback through the bundle versions), `app` (starlette routes), `server` (uvicorn in a thread).
"""
