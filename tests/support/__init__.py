"""What the tests share: the small model's labels and settings, the installed `lantern` command (common), real servers
on loopback ports and requests to them (servers), and schemathesis' checks (fuzz_checks). Tests import these from
here, never from conftest, which holds the fixtures."""
