"""A local stand-in for the Hugging Face Hub endpoints that `sd-zoo hub push` uses, for offline push tests."""
import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubStub:
    """A local stand-in for the few Hub endpoints huggingface_hub 2.4 calls to create a repo and commit files.

    It speaks the real protocol and keeps a repository: ``create`` (repo), ``validate-yaml`` (parses the
    README front matter and rejects a card without library_name or model-index), ``preupload`` (LFS for
    binary files, as the Hub's .gitattributes does, regular for text), the LFS batch API with the basic
    transfer (PUT of the bytes, checked against their sha256 oid, then verify), and ``commit`` (ndjson:
    base64 content for regular files, oid references for LFS files, which must have been uploaded).
    Anything else is a 404. Every request is recorded.
    """

    def __init__(self, token: str):
        self.token, self.requests, self.lfs, self.repos = token, [], {}, {}
        stub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 30  # a stuck client cannot hold the server thread forever

            def _body(self) -> bytes:
                if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
                    body = b''
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if not size:
                            self.rfile.readline()
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get('Content-Length') or 0))

            def _reply(self, code: int, obj=None):
                data = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(code)
                self.send_header('Content-Type', 'application/json')
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                body = self._body()
                stub.requests.append(dict(method=self.command, path=self.path, body=body,
                                          headers={k.lower(): v for k, v in self.headers.items()}))
                code, obj = stub.route(self.command, self.path.split('?')[0], body, self.headers)
                self._reply(code, obj)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}'

    def __enter__(self):
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def route(self, method, path, body, headers):
        if headers.get('Authorization') != f'Bearer {self.token}' and not path.startswith('/lfs-upload/'):
            return 401, dict(error='Invalid credentials')
        if (method, path) == ('POST', '/api/repos/create'):
            req = json.loads(body)
            repo_id = f'{req["organization"]}/{req["name"]}'
            self.repos.setdefault(repo_id, dict(private=req.get('visibility') == 'private', files={}))
            return 200, dict(url=f'{self.url}/{repo_id}')
        if (method, path) == ('POST', '/api/validate-yaml'):
            import yaml
            front = yaml.safe_load(json.loads(body)['content'].split('---')[1])
            errors = [dict(message=f'missing {k}') for k in ('library_name', 'model-index') if k not in front]
            return (400, dict(errors=errors)) if errors else (200, dict(warnings=[]))
        if method == 'POST' and '/preupload/' in path:
            files = json.loads(body)['files']
            binary = ('.safetensors', '.png')
            return 200, dict(files=[dict(path=f['path'], shouldIgnore=False,
                                         uploadMode='lfs' if f['path'].endswith(binary) else 'regular')
                                    for f in files])
        if method == 'POST' and path.endswith('.git/info/lfs/objects/batch'):
            req = json.loads(body)
            assert req['operation'] == 'upload' and 'basic' in req['transfers']
            return 200, dict(transfer='basic', objects=[dict(
                oid=o['oid'], size=o['size'], authenticated=True,
                actions=dict(upload=dict(href=f'{self.url}/lfs-upload/{o["oid"]}'),
                             verify=dict(href=f'{self.url}/lfs-verify'))) for o in req['objects']])
        if method == 'PUT' and path.startswith('/lfs-upload/'):
            oid = path.rsplit('/', 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return 400, dict(error='content does not match its sha256 oid')
            self.lfs[oid] = body
            return 200, {}
        if (method, path) == ('POST', '/lfs-verify'):
            req = json.loads(body)
            ok = req['oid'] in self.lfs and len(self.lfs[req['oid']]) == req['size']
            return (200, {}) if ok else (404, dict(error='object not uploaded'))
        if method == 'POST' and '/commit/' in path:
            repo_id = path.split('/api/models/')[1].split('/commit/')[0]
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            assert lines[0]['key'] == 'header'
            files = {}
            for line in lines[1:]:
                value = line['value']
                if line['key'] == 'file':
                    files[value['path']] = base64.b64decode(value['content'])
                elif line['key'] == 'lfsFile':
                    if value['oid'] not in self.lfs:
                        return 422, dict(error=f'LFS object {value["oid"]} was never uploaded')
                    files[value['path']] = self.lfs[value['oid']]
            self.repos[repo_id]['files'].update(files)
            self.repos[repo_id]['message'] = lines[0]['value']['summary']
            return 200, dict(commitUrl=f'{self.url}/{repo_id}/commit/{"c" * 40}', commitOid='c' * 40)
        return 404, dict(error=f'the stub does not serve {method} {path}')
