"""The live daemon: the folder watcher, the journal and checkpoints, the sockets, systemd notification,
and the threads that tie them to the pipeline. Each thread's state has one owner."""
