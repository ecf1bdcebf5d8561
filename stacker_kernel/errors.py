"""Errors a user can meet: one clear sentence, with the fix where there is one.

Anything else that escapes is our bug and keeps its traceback.
"""


class StackerKernelError(Exception):
    """Base of every user-facing error; str(e) is the one-line message.

    `title` is the headline a notebook shows above the message (the error's
    `ename`): a few plain words, never a class name.
    """

    title = "Cannot run this cell"


class StorageError(StackerKernelError):
    """The storage root is missing, not btrfs, or mounted without the options we need."""

    title = "Storage unusable"


class SessionBusyError(StackerKernelError):
    """The notebook or stacker.yaml is being built by another live kernel or build."""

    title = "Build busy"


class ContainerError(StackerKernelError):
    """The container could not be started (namespaces, id maps, mounts)."""

    title = "Container did not start"


class StepError(StackerKernelError):
    """A build step failed: non-zero status, interrupt, or its shell died."""

    title = "Step failed"


class RecipeError(StackerKernelError):
    """A stacker.yaml, a notebook or a magic line is invalid."""

    title = "Cannot run this cell"


class ImageError(StackerKernelError):
    """A base image (tar, OCI layout, registry) is unreadable or hostile."""

    title = "Base image unusable"
