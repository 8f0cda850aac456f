"""The top layer, and the only one that imports `storage/` and `adapters/` to wire them: the app
(`app.ParleyApp`, every part on one `AsyncExitStack`), the choice of generation backend
(`backends`) and of platforms (`platforms`), the `parley` command line (`cli`), logging with
secret redaction (`logs`) and `parley doctor` (`doctor`). Import the submodules directly; this
package imports nothing so that `parley --help` stays instant."""
