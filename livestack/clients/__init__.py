"""Clients of the daemon's bus. They import the event schema (`livestack.events`), never a stage."""
