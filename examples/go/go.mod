module example.com/session-gateway-example

go 1.18
