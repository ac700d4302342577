"""The plug-in API's former home, kept for compatibility: generators written against
``from ringcast.worker import JobContext`` keep working. New code imports
:mod:`ringcast.server.plugin` (docs/SERVER.md); nothing inside ringcast imports this module."""

from ringcast.server.plugin import GenerateFn, JobContext

__all__ = ["GenerateFn", "JobContext"]
