"""The directory `lcaam-patch run` puts in front of PYTHONPATH: its `sitecustomize` installs
the launcher's post-import hooks in every Python process the command starts."""
