std = "max"
max_line_length = 120
files["spec"] = { std = "+busted" }
files["spec/support/mock_server.lua"] = { globals = { "ngx" } }
exclude_files = { "build/**" }
