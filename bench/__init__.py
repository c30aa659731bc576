"""
Benchmarks of the tab relay side by side with the Socket.IO tutorial's chat server (issue #6):
`python -m bench --help`. See bench/README.md.
"""
