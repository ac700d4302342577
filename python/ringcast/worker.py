"""The plug-in API's former home: ``from ringcast.worker import JobContext`` keeps working for
generators written against it. New code imports :mod:`ringcast.server.plugin`."""

from ringcast.server.plugin import GenerateFn, JobContext

__all__ = ["GenerateFn", "JobContext"]
