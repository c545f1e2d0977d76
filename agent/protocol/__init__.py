"""The wire protocol between agent and coordinator: sans-I/O, shared by both sides."""
