// A new Azure ML workspace for tunedrop: its default storage (no shared key, identity datastores),
// its Key Vault (RBAC), the workspace, a GPU cluster that scales to zero, and the roles the
// Function App identity needs on them. Used by workspace.bicep when createWorkspace=true.
param name string
param location string
param tags object
param token string
param applicationInsightsId string
param gpuClusterVmSize string
param gpuClusterMaxNodes int
param gpuClusterName string
@description('Principal id of the Function App identity.')
param principalId string

var roles = {
  azureMLDataScientist: 'f6c7c914-8db3-469d-8ca1-694a8f32e121'
  blobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
}

resource wsStorage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  // checkov:skip=CKV_AZURE_35: the workspace's default storage must be reachable by Azure ML compute and the Function App without a VNet; access is Entra ID only (shared key off, identity datastores).
  // checkov:skip=CKV_AZURE_59: same reason.
  // checkov:skip=CKV_AZURE_33: classic Storage Analytics logging; use diagnostic settings instead.
  // checkov:skip=CKV_AZURE_206: LRS: job outputs and models are reproducible; GRS doubles the cost.
  // checkov:skip=CKV_AZURE_43: computed name (take('sttdmlw' + uniqueString(...), 24)), which checkov cannot evaluate.
  name: take('sttdmlw${token}', 24)
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: { name: 'Standard_LRS' }
  properties: {
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    allowCrossTenantReplication: false
    defaultToOAuthAuthentication: true
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { bypass: 'AzureServices', defaultAction: 'Allow' }
    encryption: {
      requireInfrastructureEncryption: true
      keySource: 'Microsoft.Storage'
      services: {
        blob: { enabled: true, keyType: 'Account' }
        file: { enabled: true, keyType: 'Account' }
      }
    }
  }
}

resource wsVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: Azure ML reaches its Key Vault over the public endpoint when the workspace has no private networking; access is RBAC only.
  // checkov:skip=CKV_AZURE_189: same reason.
  name: take('kv-tdmlw-${token}', 24)
  location: location
  tags: tags
  properties: {
    tenantId: tenant().tenantId
    sku: { family: 'A', name: 'standard' }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    enablePurgeProtection: true
    publicNetworkAccess: 'Enabled'
    networkAcls: { bypass: 'AzureServices', defaultAction: 'Allow' }
  }
}

resource newWorkspace 'Microsoft.MachineLearningServices/workspaces@2024-10-01' = {
  // checkov:skip=CKV_AZURE_243: no private endpoint: this template has no VNet (see CKV_AZURE_144); add one with private networking.
  // checkov:skip=CKV_AZURE_144: public workspace access keeps the app, the CLI and the studio usable without a VNet and private endpoints; every call needs Entra ID and RBAC.
  name: name
  location: location
  tags: tags
  identity: { type: 'SystemAssigned' }
  sku: { name: 'Basic', tier: 'Basic' }
  properties: {
    friendlyName: name
    description: 'tunedrop: fine-tuning jobs, registered models and online endpoints'
    storageAccount: wsStorage.id
    keyVault: wsVault.id
    applicationInsights: applicationInsightsId
    publicNetworkAccess: 'Enabled'
    // The default storage has no shared key: datastores authenticate with identities.
    #disable-next-line BCP037
    systemDatastoresAuthMode: 'identity'
  }
}

resource gpuCluster 'Microsoft.MachineLearningServices/workspaces/computes@2024-10-01' = {
  // checkov:skip=CKV_AZURE_150: minNodeCount is 0 (scale to zero when idle); the check wants it the other way.
  parent: newWorkspace
  name: gpuClusterName
  location: location
  tags: tags
  identity: { type: 'SystemAssigned' }
  properties: {
    computeType: 'AmlCompute'
    disableLocalAuth: true
    properties: {
      vmSize: gpuClusterVmSize
      vmPriority: 'Dedicated'
      remoteLoginPortPublicAccess: 'Disabled'
      scaleSettings: {
        minNodeCount: 0
        maxNodeCount: gpuClusterMaxNodes
        nodeIdleTimeBeforeScaleDown: 'PT15M'
      }
    }
  }
}

resource dataScientist 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceId('Microsoft.MachineLearningServices/workspaces', name), principalId, roles.azureMLDataScientist)
  scope: newWorkspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.azureMLDataScientist)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

// Identity datastores of the created workspace's storage: the workspace and cluster identities read
// and write there (job outputs, models). The app never touches this account: it writes each run's
// split to its own data account (tests/test_permissions.py finds no call that would need it).
var wsStorageId = resourceId('Microsoft.Storage/storageAccounts', take('sttdmlw${token}', 24))

resource wsStorageWorkspace 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(wsStorageId, name, 'workspace', roles.blobDataContributor)
  scope: wsStorage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataContributor)
    principalId: newWorkspace.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

resource wsStorageCluster 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(wsStorageId, name, gpuClusterName, roles.blobDataContributor)
  scope: wsStorage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.blobDataContributor)
    principalId: gpuCluster.identity.principalId
    principalType: 'ServicePrincipal'
  }
}

output id string = newWorkspace.id
output gpuClusterName string = gpuCluster.name
output gpuClusterPrincipalId string = gpuCluster.identity.principalId
