from tests.helpers import connect_unix, recv_exactly, run
def test_echo(daemons, short_dir):
    p = f"{short_dir}/e.sock"
    d = daemons("serve", "--chardev", f"socket,id=app,path={p},server=on,frontend=echo")
    s = connect_unix(p); s.sendall(b"hi"); assert recv_exactly(s, 2) == b"hi"
    r = run("status", "--json"); assert '"connected"' in r.stdout
