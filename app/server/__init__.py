"""`mixtral-chat serve`: the engine behind an OpenAI-compatible HTTP API (Starlette on uvicorn).

Every module here but `errors`, `schema`, `stops` and `queue` imports Starlette at the top: the
package is imported only by the serve command's `run`, never at CLI start-up.
"""
