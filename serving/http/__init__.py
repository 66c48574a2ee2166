"""The HTTP side of a worker: the only code that knows Request, Response and status codes. Routes (`/score`,
`/predict`, `/explain`, `/manage`), the guard around them (keys, routing, admission, deadline, metrics), request bodies
and their limits, answers, middleware, OpenAPI, the web page, and the one table that maps the runtime's and the
control plane's errors to status codes (errors.py)."""
