"""A misspelled hook: ``sslplug_los`` instead of ``sslplug_loss``."""

import sslplug


@sslplug.hookimpl
def sslplug_los():
    return None
