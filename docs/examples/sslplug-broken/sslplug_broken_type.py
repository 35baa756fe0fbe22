"""A loss hook that returns a string instead of an ``nn.Module``."""

import sslplug


@sslplug.hookimpl
def sslplug_loss():
    return "not a module"
